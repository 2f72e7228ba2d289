/*
 * snapshotter.ingest._tarhdr: the optional compiled parser of a tar header block.
 *
 * Written by hand for this project (not generated, not vendored). It parses the headers tar
 * writers write (GNU tar, Go, Python's tarfile, BuildKit, containerd...): every numeric field
 * octal ASCII, optionally led by spaces and ended by NULs or spaces, the checksum matching
 * (unsigned or signed byte sum, as Go's archive/tar accepts). For exactly those it returns
 * what snapshotter/ingest/tarstream.py's `TarHeader.unpack` computes; for ANY other block
 * (base-256 numbers, stray characters, a bad checksum, ...) it returns None, and the Python
 * parser judges the block and raises its own one-line error: the compiled path never has an
 * error message of its own to keep in step.
 *
 * parse(block: bytes) -> (name, mode, uid, gid, size, mtime, typeflag, linkname,
 *                         devmajor, devminor, magic) | None
 *   block must be exactly 512 bytes (TypeError/ValueError otherwise: the caller's bug).
 *
 * parse_pax(data: bytes) -> dict[bytes, bytes] | None
 *   the records of a PAX extended header, as `tarstream.parse_pax` gives them, for a header
 *   without GNU sparse 0.0 records (which Python joins into one map); None for one with
 *   them and for any malformed record, which the Python parser then refuses in its words.
 *
 * tests/unit/test_tarhdr.py checks it against the pure parser (EROFS_PASSTHROUGH_PURE=1
 * makes tarstream.py ignore this module).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

/* A field the Python parser reads with int(field.rstrip(b"\0 "), 8) without falling back:
 * spaces, then octal digits, then only NULs and spaces. Returns 0 and sets *out, or -1. */
static int octal_field(const unsigned char *p, int len, unsigned long long *out) {
    int i = 0;
    unsigned long long v = 0;
    while (i < len && p[i] == ' ')
        i++;
    while (i < len && p[i] >= '0' && p[i] <= '7') {
        v = (v << 3) | (unsigned long long)(p[i] - '0');
        i++;
    }
    for (; i < len; i++)
        if (p[i] != 0 && p[i] != ' ')
            return -1;
    *out = v; /* at most 12 digits: 36 bits */
    return 0;
}

static Py_ssize_t text_len(const unsigned char *p, Py_ssize_t len) {
    const unsigned char *nul = memchr(p, 0, (size_t)len);
    return nul ? nul - p : len;
}

static PyObject *parse(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "parse() takes bytes");
        return NULL;
    }
    if (PyBytes_GET_SIZE(arg) != 512) {
        PyErr_SetString(PyExc_ValueError, "parse() takes a 512-byte block");
        return NULL;
    }
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(arg);
    /* mode uid gid size mtime chksum devmajor devminor */
    static const int offs[8] = {100, 108, 116, 124, 136, 148, 329, 337};
    static const int lens[8] = {8, 8, 8, 12, 12, 8, 8, 8};
    unsigned long long v[8];
    for (int i = 0; i < 8; i++)
        if (octal_field(b + offs[i], lens[i], &v[i]) < 0)
            Py_RETURN_NONE;
    long long usum = 0, ssum = 0;
    for (int i = 0; i < 512; i++) {
        usum += b[i];
        ssum += (signed char)b[i];
    }
    for (int i = 148; i < 156; i++) {
        usum -= b[i];
        ssum -= (signed char)b[i];
    }
    usum += 8 * 32;
    ssum += 8 * 32;
    if ((long long)v[5] != usum && (long long)v[5] != ssum)
        Py_RETURN_NONE;

    PyObject *name;
    Py_ssize_t nlen = text_len(b, 100);
    if (memcmp(b + 257, "ustar\0", 6) == 0 && b[345]) {
        Py_ssize_t plen = text_len(b + 345, 155);
        name = PyBytes_FromStringAndSize(NULL, plen + 1 + nlen);
        if (name == NULL)
            return NULL;
        char *s = PyBytes_AS_STRING(name);
        memcpy(s, b + 345, (size_t)plen);
        s[plen] = '/';
        memcpy(s + plen + 1, b, (size_t)nlen);
    } else {
        name = PyBytes_FromStringAndSize((const char *)b, nlen);
        if (name == NULL)
            return NULL;
    }
    return Py_BuildValue(
        "(NKKKKKiy#KKy#)", name, v[0], v[1], v[2], v[3], v[4], (int)b[156],
        (const char *)b + 157, text_len(b + 157, 100), v[6], v[7], (const char *)b + 257,
        (Py_ssize_t)8);
}

static int is_key(const char *k, Py_ssize_t klen, const char *want) {
    size_t n = strlen(want);
    return (size_t)klen == n && memcmp(k, want, n) == 0;
}

static PyObject *parse_pax(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "parse_pax() takes bytes");
        return NULL;
    }
    const char *d = PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    PyObject *records = PyDict_New();
    if (records == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    while (pos < n) {
        if (d[pos] == 0)
            break;
        /* the length: 1 to 20 ASCII digits, then a space within 20 bytes of the start */
        Py_ssize_t space = pos;
        Py_ssize_t limit = pos + 21 < n ? pos + 21 : n;
        while (space < limit && d[space] != ' ')
            space++;
        if (space >= limit || space == pos)
            goto python;
        unsigned long long length = 0;
        for (Py_ssize_t i = pos; i < space; i++) {
            if (d[i] < '0' || d[i] > '9')
                goto python;
            if (length > (unsigned long long)n) /* beyond the data: refused below */
                goto python;
            length = length * 10 + (unsigned long long)(d[i] - '0');
        }
        if (length < 5 || length > (unsigned long long)(n - pos))
            goto python;
        Py_ssize_t end = pos + (Py_ssize_t)length;
        if (end <= space + 1 || d[end - 1] != '\n')
            goto python;
        const char *rec = d + space + 1;
        Py_ssize_t rlen = end - 1 - (space + 1);
        const char *eq = memchr(rec, '=', (size_t)rlen);
        if (eq == NULL || eq == rec || memchr(rec, 0, (size_t)(eq - rec)) != NULL)
            goto python;
        Py_ssize_t klen = eq - rec;
        const char *value = eq + 1;
        Py_ssize_t vlen = rlen - klen - 1;
        if ((is_key(rec, klen, "path") || is_key(rec, klen, "linkpath")) &&
            memchr(value, 0, (size_t)vlen) != NULL)
            goto python;
        if (is_key(rec, klen, "GNU.sparse.offset") || is_key(rec, klen, "GNU.sparse.numbytes"))
            goto python;
        PyObject *key = PyBytes_FromStringAndSize(rec, klen);
        PyObject *val = key ? PyBytes_FromStringAndSize(value, vlen) : NULL;
        if (val == NULL || PyDict_SetItem(records, key, val) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(val);
            Py_DECREF(records);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(val);
        pos = end;
    }
    return records;
python:
    Py_DECREF(records);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_O, "parse(block) -> header fields, or None for the Python parser"},
    {"parse_pax", parse_pax, METH_O, "parse_pax(data) -> records, or None for the Python parser"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tarhdr", "Compiled tar header parsing (tarstream.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarhdr(void) { return PyModule_Create(&module); }
