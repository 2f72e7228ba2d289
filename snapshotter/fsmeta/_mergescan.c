/*
 * snapshotter.fsmeta._mergescan: the optional compiled inner loop of the fsmeta merge's read.
 *
 * Written by hand for this project (not generated, not vendored). A merge visits every entry
 * of every directory of every layer: in pure Python each costs a dirent parsed (reader.py
 * `ErofsImage.listdir`) and an inode unpacked (`ErofsImage.inode_fields`), two thirds of
 * the tree's build time. This does both for a whole directory in one call.
 *
 * scan_dir(image: bytes-like, data: bytes-like, block_size: int, meta_base: int,
 *          build_time: int, build_time_nsec: int) -> list | None
 *   `data`: the directory's bytes (as `ErofsImage.read` gives them), `image`: the image's
 *   whole mapping. Returns [(name, nid, fields), ...] in on-disk order, `.` and `..` left
 *   out, `fields` exactly the tuple `ErofsImage.inode_fields(nid)` returns. Returns None
 *   when anything is not as listdir and inode_fields accept it (a bogus name offset, a name
 *   of bogus length or with '/' or NUL, an inode beyond the image or with unknown format
 *   bits): the caller then takes the pure-Python path on the same directory, which raises
 *   the error with its usual message. So this never decides what an error says, and every
 *   read is bounds-checked against the buffers' lengths before it is made.
 *
 * Only the happy path is here; the checks are those of reader.py's listdir (which mirror
 * fsck.erofs and the kernel's readdir) and of Inode.unpack_fields. tests/unit/
 * test_merge_scan.py compares both paths, on real layers and on arbitrary bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define DIRENT_SIZE 12
#define NAME_LEN_MAX 255
#define COMPACT_SIZE 32
#define EXTENDED_SIZE 64

static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

/* One entry found in the dirent pass, before any inode is read. */
typedef struct {
    Py_ssize_t name_off; /* in data */
    Py_ssize_t name_len;
    uint64_t nid;
} entry_t;

/* The dirent pass: every block checked as listdir checks it. Returns the entry count (dot
 * entries included), or -1 if the directory is not as listdir accepts it. */
static Py_ssize_t parse_dirents(const unsigned char *data, Py_ssize_t len, Py_ssize_t bs,
                                entry_t *out) {
    Py_ssize_t n = 0;
    for (Py_ssize_t blk = 0; blk < len; blk += bs) {
        const unsigned char *block = data + blk;
        Py_ssize_t blen = len - blk < bs ? len - blk : bs;
        Py_ssize_t first = blen >= 12 ? le16(block + 8) : 0;
        if (first < DIRENT_SIZE || first >= bs || first > blen)
            return -1;
        Py_ssize_t count = first / DIRENT_SIZE;
        Py_ssize_t next = first;
        for (Py_ssize_t i = 0; i < count; i++) {
            const unsigned char *d = block + i * DIRENT_SIZE;
            Py_ssize_t nameoff = le16(d + 8);
            if (nameoff != next)
                return -1;
            Py_ssize_t end;
            if (i < count - 1) {
                end = le16(d + DIRENT_SIZE + 8);
                if (end > blen)
                    end = blen;
            } else {
                const unsigned char *nul = memchr(block + nameoff, 0, (size_t)(blen - nameoff));
                end = nul ? nul - block : blen;
            }
            Py_ssize_t name_len = end - nameoff;
            if (name_len <= 0 || name_len > NAME_LEN_MAX)
                return -1;
            if (memchr(block + nameoff, '/', (size_t)name_len) ||
                memchr(block + nameoff, 0, (size_t)name_len))
                return -1;
            next += name_len;
            out[n].name_off = blk + nameoff;
            out[n].name_len = name_len;
            out[n].nid = le64(d);
            n++;
        }
    }
    return n;
}

/* The inode at `nid` as inode_fields' tuple; NULL with no exception set if it is not as
 * inode_fields accepts it, NULL with an exception on a Python failure. */
static PyObject *inode_fields(const unsigned char *img, Py_ssize_t img_len, uint64_t meta_base,
                              uint64_t nid, PyObject *build_time, PyObject *build_nsec) {
    if (nid > (UINT64_MAX - meta_base) / 32)
        return NULL;
    uint64_t pos = meta_base + nid * 32;
    if (pos > (uint64_t)img_len || (uint64_t)img_len - pos < COMPACT_SIZE)
        return NULL; /* the compact form's 32 bytes (or the format word's 2) not there */
    const unsigned char *p = img + pos;
    unsigned fmt = le16(p);
    if (fmt & ~0xFu)
        return NULL;
    unsigned icount = le16(p + 2), mode = le16(p + 4);
    if (fmt & 1) {
        if ((uint64_t)img_len - pos < EXTENDED_SIZE)
            return NULL;
        return Py_BuildValue("(KIIIkKkkkLk)", (unsigned long long)pos, fmt, icount, mode,
                             (unsigned long)le32(p + 44), (unsigned long long)le64(p + 8),
                             (unsigned long)le32(p + 16), (unsigned long)le32(p + 24),
                             (unsigned long)le32(p + 28), (long long)le64(p + 32),
                             (unsigned long)le32(p + 40));
    }
    return Py_BuildValue("(KIIIIkkIIOO)", (unsigned long long)pos, fmt, icount, mode,
                         (unsigned)le16(p + 6), (unsigned long)le32(p + 8),
                         (unsigned long)le32(p + 16), (unsigned)le16(p + 24),
                         (unsigned)le16(p + 26), build_time, build_nsec);
}

static PyObject *scan_dir(PyObject *self, PyObject *args) {
    Py_buffer image, data;
    Py_ssize_t bs;
    unsigned long long meta_base;
    PyObject *build_time, *build_nsec;
    if (!PyArg_ParseTuple(args, "y*y*nKOO", &image, &data, &bs, &meta_base, &build_time,
                          &build_nsec))
        return NULL;
    PyObject *result = NULL;
    entry_t *entries = NULL;
    if (bs <= DIRENT_SIZE || bs > 65536) {
        PyErr_SetString(PyExc_ValueError, "block size out of range");
        goto done;
    }
    /* At most one entry per 13 bytes (a dirent and a name of at least one byte). */
    Py_ssize_t cap = data.len / (DIRENT_SIZE + 1) + 1;
    entries = PyMem_Malloc(sizeof(entry_t) * (size_t)cap);
    if (entries == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const unsigned char *d = data.buf;
    Py_ssize_t n = parse_dirents(d, data.len, bs, entries);
    if (n < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = PyList_New(0);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *name = d + entries[i].name_off;
        Py_ssize_t nlen = entries[i].name_len;
        if (name[0] == '.' && (nlen == 1 || (nlen == 2 && name[1] == '.')))
            continue;
        PyObject *fields = inode_fields(image.buf, image.len, meta_base, entries[i].nid,
                                        build_time, build_nsec);
        if (fields == NULL) {
            Py_CLEAR(result);
            if (!PyErr_Occurred())
                result = Py_NewRef(Py_None);
            goto done;
        }
        PyObject *item = Py_BuildValue("(y#KN)", (const char *)name, nlen,
                                       (unsigned long long)entries[i].nid, fields);
        if (item == NULL || PyList_Append(result, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(result);
            goto done;
        }
        Py_DECREF(item);
    }
done:
    PyMem_Free(entries);
    PyBuffer_Release(&image);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_dir", scan_dir, METH_VARARGS,
     "scan_dir(image, data, block_size, meta_base, build_time, build_time_nsec) -> list | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_mergescan",
    "The fsmeta merge's compiled directory scan (optional; see merge.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__mergescan(void) { return PyModule_Create(&module); }
