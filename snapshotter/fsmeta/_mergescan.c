/*
 * snapshotter.fsmeta._mergescan: the optional compiled inner loop of the fsmeta merge's read.
 *
 * Written by hand for this project (not generated, not vendored). A merge visits every entry
 * of every directory of every layer: in pure Python each costs a dirent parsed (reader.py
 * `ErofsImage.listdir`) and an inode unpacked (`ErofsImage.inode_fields`), two thirds of
 * the tree's build time. This does both for a whole directory in one call.
 *
 * scan_dir(files, image: bytes-like, data: bytes-like, block_size: int, meta_base: int,
 *          build_time: int, build_time_nsec: int) -> list | None
 *   `data`: the directory's bytes (as `ErofsImage.read` gives them), `image`: the image's
 *   whole mapping. Returns [(name, nid, fields), ...] in on-disk order, `.` and `..` left
 *   out, `fields` exactly the tuple `ErofsImage.inode_fields(nid)` returns; with `files`
 *   (not None: see merge.py `_node_spec`) a layer's common file (regular, one extent, no
 *   xattrs, its blocks inside the image) comes as the merge's Node instead, with the
 *   attributes merge.py's pure loop gives it. Returns None
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

/* What the merge makes of its common file (merge.py `_LayerApplier._apply_dir`). */
typedef struct {
    PyTypeObject *node_type, *packed_type;
    PyObject *node_fields;   /* the Node's slots, in this order: the seven set here, then */
    PyObject *node_rest;     /* (name, value) of every other one: data, xattrs, defaults */
    PyObject *packed_fields; /* PackedChunks' two slots: chunkbits, table */
    unsigned device;         /* a layer's: its device number; an fsmeta's: its device count */
    unsigned long long sb_blocks;
    int fsmeta;              /* 0: a layer's common file; 1: an fsmeta's (merge.py
                              * `_FsmetaReader.tree`): one chunk index, no xattrs */
} files_t;

/* An instance of a slots dataclass with the given slot values, as its __init__ would set
 * them but without running Python code: allocated, then each slot set through the type's
 * member descriptor (object's own setattr, which a frozen dataclass's __setattr__ would
 * only forward to). Steals nothing. */
static PyObject *new_slotted(PyTypeObject *type, PyObject *names, PyObject *const *values,
                             PyObject *rest) {
    PyObject *obj = type->tp_alloc(type, 0);
    if (obj == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++)
        if (PyObject_GenericSetAttr(obj, PyTuple_GET_ITEM(names, i), values[i]) < 0)
            goto fail;
    if (rest != NULL)
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(rest); i++) {
            PyObject *kv = PyTuple_GET_ITEM(rest, i);
            if (PyObject_GenericSetAttr(obj, PyTuple_GET_ITEM(kv, 0), PyTuple_GET_ITEM(kv, 1)) <
                0)
                goto fail;
        }
    return obj;
fail:
    Py_DECREF(obj);
    return NULL;
}

static int bit_length(uint64_t v) {
    int n = 0;
    while (v) {
        n++;
        v >>= 1;
    }
    return n;
}

/* The common file of a layer as the merge's node: a regular file, one extent (FLAT_PLAIN),
 * no xattrs, data inside the image; or of an fsmeta (f->fsmeta): a regular file, chunk-based
 * with one 8-byte chunk index (on one of the first f->device devices, or a hole), no xattrs.
 * Py_None (a new reference) for anything else, which the merge then reads field by field
 * (and if need be refuses, with its message); NULL on a Python failure. The inode is at
 * byte `pos` of the image, its bytes known to be there. */
static PyObject *file_node(const files_t *f, const unsigned char *img, Py_ssize_t img_len,
                           uint64_t pos, uint64_t bs, PyObject *build_time,
                           PyObject *build_nsec) {
    const unsigned char *p = img + pos;
    unsigned fmt = le16(p), icount = le16(p + 2), mode = le16(p + 4);
    uint64_t size, i_u;
    unsigned long uid, gid, nsec = 0;
    long long mtime = 0;
    unsigned layout = f->fsmeta ? 4 : 0; /* CHUNK_BASED : FLAT_PLAIN */
    if ((mode & 0170000) != 0100000 || ((fmt >> 1) & 7) != layout || icount != 0)
        Py_RETURN_NONE;
    if (fmt & 1) {
        size = le64(p + 8);
        i_u = le32(p + 16);
        uid = le32(p + 24);
        gid = le32(p + 28);
        mtime = (long long)le64(p + 32);
        nsec = le32(p + 40);
    } else {
        size = le32(p + 8);
        i_u = le32(p + 16);
        uid = le16(p + 24);
        gid = le16(p + 26);
    }
    unsigned char index[8];
    int bits;
    if (f->fsmeta) {
        /* merge.py: i_u & ~0x1F == CHUNK_FORMAT_INDEXES and 0 < size <= bs << chunkbits */
        if ((i_u & ~0x1FULL) != 0x20 || size == 0)
            Py_RETURN_NONE;
        bits = (int)(i_u & 0x1F);
        if (size > (bs << bits))
            Py_RETURN_NONE;
        uint64_t at = (pos + (fmt & 1 ? 64 : 32) + 7) & ~7ULL;
        if (at > (uint64_t)img_len || (uint64_t)img_len - at < 8)
            Py_RETURN_NONE; /* read_at refuses it, with its message */
        memcpy(index, img + at, 8);
        unsigned device = le16(index + 2);
        if (le32(index + 4) != 0xFFFFFFFFu && !(device > 0 && device <= f->device))
            Py_RETURN_NONE; /* not continuable: the merge's loop says so */
    } else {
        if (size == 0 || size >= (1ULL << 63))
            Py_RETURN_NONE;
        uint64_t nblocks = (size + bs - 1) / bs;
        bits = bit_length(nblocks - 1);
        if (i_u + nblocks > f->sb_blocks || bits > 31)
            Py_RETURN_NONE; /* the merge's _leaf checks it and says why */
        unsigned char layer_index[8] = {
            0, 0, (unsigned char)f->device, (unsigned char)(f->device >> 8),
            (unsigned char)i_u, (unsigned char)(i_u >> 8), (unsigned char)(i_u >> 16),
            (unsigned char)(i_u >> 24)};
        memcpy(index, layer_index, 8);
    }
    PyObject *packed = NULL, *node = NULL;
    PyObject *a[7] = {NULL};
    a[0] = PyLong_FromLong(bits);
    a[1] = PyBytes_FromStringAndSize((const char *)index, 8);
    if (a[0] == NULL || a[1] == NULL)
        goto done;
    packed = new_slotted(f->packed_type, f->packed_fields, a, NULL);
    Py_CLEAR(a[0]);
    Py_CLEAR(a[1]);
    if (packed == NULL)
        goto done;
    a[0] = PyLong_FromUnsignedLong(mode);
    a[1] = PyLong_FromUnsignedLong(uid);
    a[2] = PyLong_FromUnsignedLong(gid);
    if (fmt & 1) {
        a[3] = PyLong_FromLongLong(mtime);
        a[4] = PyLong_FromUnsignedLong(nsec);
    } else {
        a[3] = Py_NewRef(build_time);
        a[4] = Py_NewRef(build_nsec);
    }
    a[5] = PyLong_FromUnsignedLongLong(size);
    a[6] = Py_NewRef(packed);
    for (int i = 0; i < 7; i++)
        if (a[i] == NULL)
            goto done;
    node = new_slotted(f->node_type, f->node_fields, a, f->node_rest);
done:
    for (int i = 0; i < 7; i++)
        Py_XDECREF(a[i]);
    Py_XDECREF(packed);
    return node;
}

static int all_str(PyObject *tuple) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++)
        if (!PyUnicode_Check(PyTuple_GET_ITEM(tuple, i)))
            return 0;
    return 1;
}

/* The `files` argument: (Node, PackedChunks, Node's 7 slot names, ((name, value), ...) for
 * the rest, PackedChunks' 2 slot names, device, image blocks[, fsmeta]). 0, or -1 with
 * ValueError. */
static int parse_spec(PyObject *spec, files_t *f) {
    f->fsmeta = 0;
    if (!PyTuple_Check(spec) ||
        !PyArg_ParseTuple(spec, "O!O!O!O!O!IK|p", &PyType_Type, &f->node_type, &PyType_Type,
                          &f->packed_type, &PyTuple_Type, &f->node_fields, &PyTuple_Type,
                          &f->node_rest, &PyTuple_Type, &f->packed_fields, &f->device,
                          &f->sb_blocks, &f->fsmeta))
        goto bad;
    if (PyTuple_GET_SIZE(f->node_fields) != 7 || PyTuple_GET_SIZE(f->packed_fields) != 2 ||
        !all_str(f->node_fields) || !all_str(f->packed_fields) || f->device > 0xFFFF)
        goto bad;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(f->node_rest); i++) {
        PyObject *kv = PyTuple_GET_ITEM(f->node_rest, i);
        if (!PyTuple_Check(kv) || PyTuple_GET_SIZE(kv) != 2 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(kv, 0)))
            goto bad;
    }
    return 0;
bad:
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "scan_dir: bad files argument");
    return -1;
}

static PyObject *scan_dir(PyObject *self, PyObject *args) {
    Py_buffer image, data;
    Py_ssize_t bs;
    unsigned long long meta_base;
    PyObject *spec, *build_time, *build_nsec;
    files_t files = {NULL};
    int make_files = 0;
    if (!PyArg_ParseTuple(args, "Oy*y*nKOO", &spec, &image, &data, &bs, &meta_base,
                          &build_time, &build_nsec))
        return NULL;
    if (spec != Py_None) {
        if (parse_spec(spec, &files) < 0) {
            PyBuffer_Release(&image);
            PyBuffer_Release(&data);
            return NULL;
        }
        make_files = 1;
    }
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
        if (fields != NULL && make_files) {
            /* inode_fields checked the inode lies in the image: its bytes are there */
            PyObject *node = file_node(&files, image.buf, image.len,
                                       meta_base + entries[i].nid * 32, (uint64_t)bs,
                                       build_time, build_nsec);
            if (node == NULL) {
                Py_CLEAR(fields);
                Py_CLEAR(result);
                goto done;
            }
            if (node != Py_None)
                Py_SETREF(fields, node);
            else
                Py_DECREF(node);
        }
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
     "scan_dir(files, image, data, block_size, meta_base, build_time, build_time_nsec)"
     " -> list | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_mergescan",
    "The fsmeta merge's compiled directory scan (optional; see merge.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__mergescan(void) { return PyModule_Create(&module); }
