/*
 * snapshotter.verity._hashrun: the optional compiled inner loop of dm-verity hashing.
 *
 * Written by hand for this project (not generated, not vendored). It does exactly what the
 * pure-Python loop in snapshotter/verity/hashing.py does, H(salt || block) for each whole
 * block of a buffer, with OpenSSL's libcrypto EVP (the same implementation hashlib uses,
 * SHA-NI where the CPU has it), but:
 *   - without a Python object, a slice and a method call per 4 KiB block (the Python loop's
 *     cost on top of the hashing itself, about 1.4x veritysetup's CPU time), and
 *   - with the GIL released for the whole run, so threads (parallel.py, a conversion's
 *     background hashing thread) hash on every core in one interpreter.
 *
 * hash_run(name: str, salt: bytes-like, data: bytes-like, block_size: int) -> bytes
 *   the concatenated digests; len(data) must be a multiple of block_size. ValueError for a
 *   hash name libcrypto does not know (the Python side only passes the ones it supports).
 *
 * The buffer stays exported (PyObject_GetBuffer) while the GIL is released, so an mmap
 * cannot be closed or a bytearray resized under the loop. If this module fails to build or
 * import, hashing.py uses its pure-Python loop; tests check both give the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/evp.h>
#include <openssl/opensslv.h>
#include <string.h>

/* Digests fetched once per name (a fetch in OpenSSL 3 takes locks and a lookup). Only
 * touched with the GIL held. */
#define MAX_CACHED 8
static struct {
    char name[32];
    EVP_MD *md;
} md_cache[MAX_CACHED];
static int md_cached;

static const EVP_MD *get_md(const char *name) {
    for (int i = 0; i < md_cached; i++)
        if (strcmp(md_cache[i].name, name) == 0)
            return md_cache[i].md;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    EVP_MD *md = EVP_MD_fetch(NULL, name, NULL);
#else
    EVP_MD *md = (EVP_MD *)EVP_get_digestbyname(name);
#endif
    if (md == NULL)
        return NULL;
    if (md_cached < MAX_CACHED && strlen(name) < sizeof md_cache[0].name) {
        strcpy(md_cache[md_cached].name, name);
        md_cache[md_cached].md = md;
        md_cached++;
    }
    /* Beyond the cache (never with the two names we use) the digest object leaks: a few
     * hundred bytes per call at most, and freeing it would need the call to keep it. */
    return md;
}

/* Hash `count` blocks; 0 on success, -1 if libcrypto failed. Runs without the GIL. */
static int hash_blocks(const EVP_MD *md, const unsigned char *salt, size_t salt_len,
                       const unsigned char *data, size_t count, size_t block_size,
                       unsigned char *out, size_t digest_size) {
    int ok = 0;
    EVP_MD_CTX *base = EVP_MD_CTX_new();
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (base == NULL || ctx == NULL)
        goto done;
    if (!EVP_DigestInit_ex(base, md, NULL) || !EVP_DigestUpdate(base, salt, salt_len))
        goto done;
    for (size_t i = 0; i < count; i++) {
        unsigned int n = 0;
        if (!EVP_MD_CTX_copy_ex(ctx, base) ||
            !EVP_DigestUpdate(ctx, data + i * block_size, block_size) ||
            !EVP_DigestFinal_ex(ctx, out + i * digest_size, &n) || n != digest_size)
            goto done;
    }
    ok = 1;
done:
    EVP_MD_CTX_free(ctx);
    EVP_MD_CTX_free(base);
    return ok ? 0 : -1;
}

static PyObject *hash_run(PyObject *self, PyObject *args) {
    const char *name;
    Py_buffer salt, data;
    Py_ssize_t block_size;
    PyObject *result = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "sy*y*n:hash_run", &name, &salt, &data, &block_size))
        return NULL;
    const EVP_MD *md = get_md(name);
    if (md == NULL) {
        PyErr_Format(PyExc_ValueError, "hash_run: libcrypto has no digest %s", name);
        goto out;
    }
    if (block_size <= 0 || data.len % block_size) {
        PyErr_Format(PyExc_ValueError, "hash_run: %zd bytes are not whole %zd-byte blocks",
                     data.len, block_size);
        goto out;
    }
    size_t digest_size = (size_t)EVP_MD_size(md);
    size_t count = (size_t)(data.len / block_size);
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * digest_size));
    if (result == NULL)
        goto out;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(result);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = hash_blocks(md, salt.buf, (size_t)salt.len, data.buf, count, (size_t)block_size, dst,
                     digest_size);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_RuntimeError, "hash_run: libcrypto failed");
    }
out:
    PyBuffer_Release(&data);
    PyBuffer_Release(&salt);
    return result;
}

static PyMethodDef methods[] = {
    {"hash_run", hash_run, METH_VARARGS,
     "hash_run(name, salt, data, block_size) -> the digests H(salt || block) of each whole "
     "block of data, concatenated; the GIL is released while hashing."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hashrun", "dm-verity block hashing without the GIL (optional).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__hashrun(void) { return PyModule_Create(&module); }
