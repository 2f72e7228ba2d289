/*
 * snapshotter.fsmeta._mergepack: the optional compiled loops of the metadata writer.
 *
 * Written by hand for this project (not generated, not vendored). writer.py
 * `write_metadata` lays out and packs every inode and directory block of an image in three
 * loops (snapshotter/erofs/format.py `layout_inode_table`, `pack_inode_table`,
 * `pack_dir_blocks`), after walking the tree (writer.py `_walk_tree`), planning each
 * directory's blocks (`_dir_block_plan`) and filling the inodes' columns; an fsmeta merge
 * runs them over every inode of the merged tree, and in Python they were most of its
 * write. These are the same loops, giving the same bytes (tests/unit/test_writer_loops.py
 * and test_merge_scan.py compare them):
 *
 * layout_inode_table(heads, tables, tails, meta_start, base, block_size)
 *   -> (nids, end) | None
 * pack_inode_table(meta, order, nids, heads, layouts, links, sizes, i_us, xbodies, tables,
 *                  tails, offset) -> bool
 * pack_dir_blocks(groups, children, nid_of, own_nid, parent_nid) -> list[bytes] | None
 * walk_tree(root) -> (order, links, parents) | None   (writer.py `_walk_tree`)
 * dir_block_plan(children, block_size) -> (groups, last_used) | None   (`_dir_block_plan`)
 * file_columns(order, links, ct_sec, ct_nsec, packed_type, heads, layouts, i_us, sizes,
 *              tables) -> (rest, handled) | None   (write_metadata's column loop, in part)
 * common_mtime(order) -> (sec, nsec) | None   (the build time `pick_build_time` picks)
 *
 * Anything they do not expect (a value out of the range its field holds, a missing child,
 * a write that would not land inside `meta`, a type other than the writer's) makes them
 * return None / False without raising: the caller then runs the pure-Python loop, whose
 * error (if any) is the one it always gave. pack_inode_table may have written some inodes
 * by then; the pure loop writes every one of them again, the same bytes in the same places.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <structmember.h>

#include <stdint.h>
#include <string.h>

static PyObject *s_mode, *s_uid, *s_gid, *s_mtime, *s_mtime_nsec;

/* An int in [lo, hi], or -1 (no exception left) if it is not one. */
static int get_ll(PyObject *v, long long lo, long long hi, long long *out) {
    if (!PyLong_Check(v))
        return -1;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    if (x < lo || x > hi)
        return -1;
    *out = x;
    return 0;
}

static int get_u64(PyObject *v, unsigned long long *out) {
    if (!PyLong_Check(v))
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = x;
    return 0;
}

/* tails.get(i) as a non-empty bytes object (borrowed), NULL if none or empty; -1 in *bad if
 * the dict holds something else. */
static PyObject *get_tail(PyObject *tails, Py_ssize_t i, int *bad) {
    if (PyDict_GET_SIZE(tails) == 0)
        return NULL;
    PyObject *key = PyLong_FromSsize_t(i);
    if (key == NULL) {
        PyErr_Clear();
        *bad = 1;
        return NULL;
    }
    PyObject *tail = PyDict_GetItemWithError(tails, key);
    Py_DECREF(key);
    if (tail == NULL) {
        if (PyErr_Occurred()) {
            PyErr_Clear();
            *bad = 1;
        }
        return NULL;
    }
    if (!PyBytes_Check(tail)) {
        *bad = 1;
        return NULL;
    }
    return PyBytes_GET_SIZE(tail) ? tail : NULL;
}

static PyObject *layout_inode_table(PyObject *self, PyObject *args) {
    PyObject *heads, *tables, *tails;
    long long meta_start, base, bs;
    if (!PyArg_ParseTuple(args, "O!OO!LLL", &PyList_Type, &heads, &tables, &PyDict_Type,
                          &tails, &meta_start, &base, &bs))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(heads);
    if (tables == Py_None)
        tables = NULL;
    else if (!PyList_Check(tables) || PyList_GET_SIZE(tables) < count)
        Py_RETURN_NONE;
    if (bs <= 0 || meta_start < 0 || base < 0 || base > meta_start)
        Py_RETURN_NONE;
    const long long limit = (long long)1 << 62; /* far beyond any image; no overflow below */
    PyObject *nids = PyList_New(count);
    if (nids == NULL)
        return NULL;
    long long pos = meta_start;
    for (Py_ssize_t i = 0; i < count; i++) {
        long long size;
        int bad = 0;
        pos = (pos + 31) & ~31LL;
        if (get_ll(PyList_GET_ITEM(heads, i), 0, 1 << 20, &size) < 0)
            goto fallback;
        if (tables != NULL) {
            PyObject *table = PyList_GET_ITEM(tables, i);
            if (table != Py_None) {
                if (!PyBytes_Check(table))
                    goto fallback;
                size = ((size + 7) & ~7LL) + PyBytes_GET_SIZE(table);
            }
        }
        PyObject *tail = get_tail(tails, i, &bad);
        if (bad)
            goto fallback;
        if (tail != NULL) {
            long long tail_start = pos + size, len = PyBytes_GET_SIZE(tail);
            if (tail_start / bs != (tail_start + len - 1) / bs)
                pos = (pos + bs - 1) / bs * bs;
            size += len;
        }
        if (pos > limit || size > limit)
            goto fallback;
        PyObject *nid = PyLong_FromLongLong((pos - base) / 32);
        if (nid == NULL) {
            Py_DECREF(nids);
            return NULL;
        }
        PyList_SET_ITEM(nids, i, nid);
        pos += size;
    }
    return Py_BuildValue("(NL)", nids, pos);
fallback:
    Py_DECREF(nids);
    Py_RETURN_NONE;
}

static void put16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put32(unsigned char *p, unsigned long v) {
    put16(p, (unsigned)(v & 0xFFFF));
    put16(p + 2, (unsigned)((v >> 16) & 0xFFFF));
}

static void put64(unsigned char *p, unsigned long long v) {
    put32(p, (unsigned long)(v & 0xFFFFFFFFu));
    put32(p + 4, (unsigned long)(v >> 32));
}

/* Copy `src` (bytes) into meta at [at, at + len), if that lies inside it. */
static int copy_in(unsigned char *meta, Py_ssize_t meta_len, long long at, PyObject *src) {
    Py_ssize_t len = PyBytes_GET_SIZE(src);
    if (at < 0 || at > meta_len || meta_len - at < len)
        return -1;
    memcpy(meta + at, PyBytes_AS_STRING(src), (size_t)len);
    return 0;
}

/* One node's attribute as an int in [lo, hi]. */
static int node_attr(PyObject *node, PyObject *name, long long lo, long long hi,
                     long long *out) {
    PyObject *v = PyObject_GetAttr(node, name);
    if (v == NULL) {
        PyErr_Clear();
        return -1;
    }
    int r = get_ll(v, lo, hi, out);
    Py_DECREF(v);
    return r;
}

static PyObject *pack_inode_table(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *order, *nids, *heads, *layouts, *links, *sizes, *i_us, *xbodies, *tables, *tails;
    long long offset;
    if (!PyArg_ParseTuple(args, "w*O!O!O!O!O!O!O!O!OO!L", &buf, &PyList_Type, &order,
                          &PyList_Type, &nids, &PyList_Type, &heads, &PyByteArray_Type,
                          &layouts, &PyList_Type, &links, &PyList_Type, &sizes, &PyList_Type,
                          &i_us, &PyDict_Type, &xbodies, &tables, &PyDict_Type, &tails,
                          &offset))
        return NULL;
    int ok = 0;
    unsigned char *meta = buf.buf;
    Py_ssize_t meta_len = buf.len;
    Py_ssize_t count = PyList_GET_SIZE(order);
    if (tables == Py_None)
        tables = NULL;
    else if (!PyList_Check(tables) || PyList_GET_SIZE(tables) < count)
        goto done;
    if (PyList_GET_SIZE(nids) < count || PyList_GET_SIZE(heads) < count ||
        PyByteArray_GET_SIZE(layouts) < count || PyList_GET_SIZE(links) < count ||
        PyList_GET_SIZE(sizes) < count || PyList_GET_SIZE(i_us) < count || count > 0xFFFFFFFEL)
        goto done;
    const unsigned char *layout = (const unsigned char *)PyByteArray_AS_STRING(layouts);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *node = PyList_GET_ITEM(order, i);
        long long nid, head, nlink, i_u, mode, uid, gid, mtime, nsec;
        unsigned long long size;
        if (get_ll(PyList_GET_ITEM(nids, i), 0, (long long)1 << 57, &nid) < 0 ||
            get_ll(PyList_GET_ITEM(heads, i), 0, 1 << 20, &head) < 0 ||
            get_ll(PyList_GET_ITEM(links, i), 0, 0xFFFFFFFFLL, &nlink) < 0 ||
            get_u64(PyList_GET_ITEM(sizes, i), &size) < 0 ||
            get_ll(PyList_GET_ITEM(i_us, i), 0, 0xFFFFFFFFLL, &i_u) < 0 ||
            node_attr(node, s_mode, 0, 0xFFFF, &mode) < 0 ||
            node_attr(node, s_uid, 0, 0xFFFFFFFFLL, &uid) < 0 ||
            node_attr(node, s_gid, 0, 0xFFFFFFFFLL, &gid) < 0)
            goto done;
        PyObject *xbody = NULL;
        Py_ssize_t xsize = 0;
        if (PyDict_GET_SIZE(xbodies)) {
            PyObject *key = PyLong_FromSsize_t(i);
            if (key == NULL)
                goto error;
            xbody = PyDict_GetItemWithError(xbodies, key);
            Py_DECREF(key);
            if (xbody == NULL && PyErr_Occurred())
                goto error;
            if (xbody != NULL) {
                if (!PyBytes_Check(xbody) || PyBytes_GET_SIZE(xbody) < 12)
                    goto done;
                xsize = PyBytes_GET_SIZE(xbody);
            }
        }
        unsigned fmt = (head - xsize == 64 ? 1 : 0) | ((unsigned)layout[i] << 1);
        long long icount = xbody == NULL ? 0 : 1 + (xsize - 12) / 4;
        long long off = offset + nid * 32;
        if (icount > 0xFFFF || fmt > 0xFFFF || off < 0)
            goto done;
        unsigned char *p;
        if (fmt & 1) {
            if (node_attr(node, s_mtime, INT64_MIN, INT64_MAX, &mtime) < 0 ||
                node_attr(node, s_mtime_nsec, 0, 0xFFFFFFFFLL, &nsec) < 0)
                goto done;
            if (off > meta_len || meta_len - off < 64)
                goto done;
            p = meta + off;
            put16(p, fmt);
            put16(p + 2, (unsigned)icount);
            put16(p + 4, (unsigned)mode);
            put16(p + 6, 0);
            put64(p + 8, size);
            put32(p + 16, (unsigned long)i_u);
            put32(p + 20, (unsigned long)(i + 1));
            put32(p + 24, (unsigned long)uid);
            put32(p + 28, (unsigned long)gid);
            put64(p + 32, (unsigned long long)mtime);
            put32(p + 40, (unsigned long)nsec);
            put32(p + 44, (unsigned long)nlink);
            memset(p + 48, 0, 16);
        } else {
            /* Compact: every field as `struct` checks it for "<HHHHIIIIHHI" (mtime and
             * nsec are not stored, as Inode.pack_into does not read them then). */
            if (nlink > 0xFFFF || size > 0xFFFFFFFFULL || uid > 0xFFFF || gid > 0xFFFF)
                goto done;
            if (node_attr(node, s_mtime, INT64_MIN, INT64_MAX, &mtime) < 0 ||
                node_attr(node, s_mtime_nsec, INT64_MIN, INT64_MAX, &nsec) < 0)
                goto done; /* the pure loop reads them: an object without them fails there */
            if (off > meta_len || meta_len - off < 32)
                goto done;
            p = meta + off;
            put16(p, fmt);
            put16(p + 2, (unsigned)icount);
            put16(p + 4, (unsigned)mode);
            put16(p + 6, (unsigned)nlink);
            put32(p + 8, (unsigned long)size);
            put32(p + 12, 0);
            put32(p + 16, (unsigned long)i_u);
            put32(p + 20, (unsigned long)(i + 1));
            put16(p + 24, (unsigned)uid);
            put16(p + 26, (unsigned)gid);
            put32(p + 28, 0);
        }
        off += head;
        if (xbody != NULL && copy_in(meta, meta_len, off - xsize, xbody) < 0)
            goto done;
        if (tables != NULL) {
            PyObject *table = PyList_GET_ITEM(tables, i);
            if (table != Py_None) {
                if (!PyBytes_Check(table))
                    goto done;
                off = (off + 7) & ~7LL;
                if (copy_in(meta, meta_len, off, table) < 0)
                    goto done;
                off += PyBytes_GET_SIZE(table);
            }
        }
        int bad = 0;
        PyObject *tail = get_tail(tails, i, &bad);
        if (bad)
            goto done;
        if (tail != NULL && copy_in(meta, meta_len, off, tail) < 0)
            goto done;
    }
    ok = 1;
done:
    PyBuffer_Release(&buf);
    return PyBool_FromLong(ok);
error:
    PyBuffer_Release(&buf);
    return NULL;
}

static int file_type(long mode) {
    switch (mode & 0170000) {
    case 0100000: return 1; /* FT_REG_FILE */
    case 0040000: return 2; /* FT_DIR */
    case 0020000: return 3; /* FT_CHRDEV */
    case 0060000: return 4; /* FT_BLKDEV */
    case 0010000: return 5; /* FT_FIFO */
    case 0140000: return 6; /* FT_SOCK */
    case 0120000: return 7; /* FT_SYMLINK */
    default: return 0;
    }
}

/* One directory block of `names`, or NULL: with an exception set on a Python failure,
 * without one when the pure loop must do it. */
static PyObject *dir_block(PyObject *names, PyObject *children, PyObject *nid_of,
                           unsigned long long own, unsigned long long parent) {
    Py_ssize_t count = PyList_GET_SIZE(names), total = 12 * count;
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *name = PyList_GET_ITEM(names, j);
        if (!PyBytes_Check(name))
            return NULL;
        total += PyBytes_GET_SIZE(name);
    }
    PyObject *block = PyBytes_FromStringAndSize(NULL, total);
    if (block == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(block);
    Py_ssize_t nameoff = 12 * count;
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *name = PyList_GET_ITEM(names, j);
        const char *s = PyBytes_AS_STRING(name);
        Py_ssize_t len = PyBytes_GET_SIZE(name);
        unsigned long long nid;
        int ftype;
        if (len == 1 && s[0] == '.') {
            nid = own;
            ftype = 2;
        } else if (len == 2 && s[0] == '.' && s[1] == '.') {
            nid = parent;
            ftype = 2;
        } else {
            PyObject *child = PyDict_GetItemWithError(children, name);
            if (child == NULL)
                goto fail;
            PyObject *key = PyLong_FromVoidPtr(child); /* id(child) */
            if (key == NULL)
                goto fail;
            PyObject *v = PyDict_GetItemWithError(nid_of, key);
            Py_DECREF(key);
            long long mode;
            if (v == NULL || get_u64(v, &nid) < 0 || node_attr(child, s_mode, LLONG_MIN,
                                                                LLONG_MAX, &mode) < 0)
                goto fail;
            ftype = file_type((long)mode);
        }
        if (nameoff > 0xFFFF)
            goto fail;
        unsigned char *d = out + 12 * j;
        put64(d, nid);
        put16(d + 8, (unsigned)nameoff);
        d[10] = (unsigned char)ftype;
        d[11] = 0;
        memcpy(out + nameoff, s, (size_t)len);
        nameoff += len;
    }
    return block;
fail:
    Py_DECREF(block);
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_MemoryError))
        PyErr_Clear();
    return NULL;
}

static PyObject *pack_dir_blocks(PyObject *self, PyObject *args) {
    PyObject *groups, *children, *nid_of, *own_obj, *parent_obj;
    unsigned long long own, parent;
    if (!PyArg_ParseTuple(args, "O!O!O!OO", &PyList_Type, &groups, &PyDict_Type, &children,
                          &PyDict_Type, &nid_of, &own_obj, &parent_obj))
        return NULL;
    if (get_u64(own_obj, &own) < 0 || get_u64(parent_obj, &parent) < 0)
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(groups);
    PyObject *blocks = PyList_New(n);
    if (blocks == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *names = PyList_GET_ITEM(groups, i);
        PyObject *block = PyList_Check(names) ? dir_block(names, children, nid_of, own, parent)
                                              : NULL;
        if (block == NULL) {
            Py_DECREF(blocks);
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_NONE;
        }
        PyList_SET_ITEM(blocks, i, block);
    }
    return blocks;
}

/* -- walk_tree(root) -> (order, links, parents) | None ----------------------------------
 *
 * writer.py `_walk_tree_pure` in one call: every node once (root first, then depth-first by
 * sorted name), each one's link count and, for a directory, its parent's index in `order`
 * (the root's is 0). The nodes are counted by address in a table of this loop's own, not
 * by `id` in a dict, and `children` read by its slot's offset (every node must be of the
 * root's class). The tree is not changed while it runs (no Python code runs: a node's
 * `children` is read as a dict, names compared as bytes), so the nodes and dicts it only
 * borrows stay alive. None for anything else (a node without `children`, keys that are
 * not bytes): the pure walk runs instead. */

/* The offset of a class's slot `name` (an object member, as __slots__ makes), or -1. */
static Py_ssize_t slot_offset(PyTypeObject *type, const char *name) {
    PyObject *key = PyUnicode_InternFromString(name);
    if (key == NULL)
        return -1;
    PyObject *descr = _PyType_Lookup(type, key); /* borrowed */
    Py_DECREF(key);
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type))
        return -1;
    PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
    if (m->type != T_OBJECT_EX)
        return -1;
    return m->offset;
}

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

typedef struct {
    PyObject *node; /* NULL: a free slot */
    Py_ssize_t links, index, parent;
} walk_slot;

typedef struct {
    walk_slot *slots;
    size_t mask, used;
} walk_table;

static walk_slot *walk_find(walk_table *t, PyObject *node) {
    size_t h = (size_t)node >> 4; /* nodes made one after another land near: cache-friendly */
    for (size_t i = h & t->mask;; i = (i + 1) & t->mask) {
        walk_slot *s = &t->slots[i];
        if (s->node == node || s->node == NULL)
            return s;
    }
}

/* The slot of `node`, made if new; NULL (MemoryError set) if the table cannot grow. */
static walk_slot *walk_get(walk_table *t, PyObject *node) {
    walk_slot *s = walk_find(t, node);
    if (s->node != NULL)
        return s;
    if ((t->used + 1) * 2 > t->mask + 1) {
        size_t size = (t->mask + 1) * 2;
        walk_slot *old = t->slots, *grown = PyMem_Calloc(size, sizeof(walk_slot));
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        size_t old_size = t->mask + 1;
        t->slots = grown;
        t->mask = size - 1;
        for (size_t i = 0; i < old_size; i++)
            if (old[i].node != NULL)
                *walk_find(t, old[i].node) = old[i];
        PyMem_Free(old);
        s = walk_find(t, node);
    }
    s->node = node;
    s->links = 0;
    s->index = -1;
    s->parent = 0;
    t->used++;
    return s;
}

static PyObject *walk_tree(PyObject *self, PyObject *root) {
    walk_table t = {PyMem_Calloc(1024, sizeof(walk_slot)), 1023, 0};
    PyObject *order = PyList_New(0), *result = NULL;
    PyObject *links = NULL, *parents = NULL;
    PyTypeObject *node_type = Py_TYPE(root);
    Py_ssize_t o_children = slot_offset(node_type, "children");
    size_t depth = 1, room = 256;
    PyObject **stack = PyMem_Malloc(room * sizeof(PyObject *)); /* borrowed: the tree's */
    int fallback = 0;
    if (t.slots == NULL || stack == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (order == NULL)
        goto done;
    if (o_children < 0) {
        fallback = 1;
        goto done;
    }
    stack[0] = root;
    while (depth) {
        PyObject *node = stack[--depth];
        walk_slot *slot = walk_get(&t, node);
        if (slot == NULL)
            goto done;
        if (slot->index >= 0)
            continue;
        Py_ssize_t index = PyList_GET_SIZE(order);
        slot->index = index;
        if (PyList_Append(order, node) < 0)
            goto done;
        PyObject *children = SLOT(node, o_children); /* borrowed: the node holds it */
        if (children == NULL) { /* unset */
            fallback = 1;
            goto done;
        }
        if (children == Py_None)
            continue;
        if (!PyDict_CheckExact(children)) {
            fallback = 1;
            goto done;
        }
        Py_ssize_t subdirs = 0, pos = 0;
        PyObject *name, *child;
        while (PyDict_Next(children, &pos, &name, &child)) {
            if (!PyBytes_CheckExact(name) || Py_TYPE(child) != node_type) {
                fallback = 1;
                goto done;
            }
            PyObject *grand = SLOT(child, o_children);
            if (grand == NULL) {
                fallback = 1;
                goto done;
            }
            walk_slot *cs = walk_get(&t, child);
            if (cs == NULL)
                goto done;
            slot = walk_find(&t, node); /* the table may have moved */
            if (grand == Py_None) {
                cs->links += 1;
            } else {
                subdirs++;
                cs->parent = index;
            }
        }
        slot->links += 2 + subdirs;
        if (PyDict_GET_SIZE(children)) {
            PyObject *names = PyDict_Keys(children);
            if (names == NULL || PyList_Sort(names) < 0 || PyList_Reverse(names) < 0) {
                Py_XDECREF(names);
                goto done;
            }
            size_t n = (size_t)PyList_GET_SIZE(names);
            if (depth + n > room) {
                while (depth + n > room)
                    room *= 2;
                PyObject **grown = PyMem_Realloc(stack, room * sizeof(PyObject *));
                if (grown == NULL) {
                    Py_DECREF(names);
                    PyErr_NoMemory();
                    goto done;
                }
                stack = grown;
            }
            for (size_t j = 0; j < n; j++) {
                PyObject *c = PyDict_GetItemWithError(children, PyList_GET_ITEM(names, j));
                if (c == NULL) {
                    Py_DECREF(names);
                    if (!PyErr_Occurred())
                        fallback = 1;
                    goto done;
                }
                stack[depth++] = c;
            }
            Py_DECREF(names);
        }
    }
    Py_ssize_t count = PyList_GET_SIZE(order);
    links = PyList_New(count);
    parents = PyList_New(count);
    if (links == NULL || parents == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        walk_slot *s = walk_find(&t, PyList_GET_ITEM(order, i));
        PyObject *l = PyLong_FromSsize_t(s->links), *p = PyLong_FromSsize_t(s->parent);
        PyList_SET_ITEM(links, i, l);
        PyList_SET_ITEM(parents, i, p);
        if (l == NULL || p == NULL)
            goto done;
    }
    result = PyTuple_Pack(3, order, links, parents);
done:
    PyMem_Free(t.slots);
    PyMem_Free(stack);
    Py_XDECREF(order);
    Py_XDECREF(links);
    Py_XDECREF(parents);
    if (fallback) {
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_MemoryError))
            PyErr_Clear();
        if (!PyErr_Occurred())
            Py_RETURN_NONE;
    }
    return result;
}

/* -- dir_block_plan(children, block_size) -> (groups, last_used) | None ------------------
 *
 * writer.py `_dir_block_plan_pure`: the directory's names and `.` and `..`, sorted (as
 * bytes compare), grouped into blocks of at most `block_size` bytes of dirents and names,
 * and the bytes the last block takes. None for a name that is not bytes. */
static PyObject *dir_block_plan(PyObject *self, PyObject *args) {
    PyObject *children;
    Py_ssize_t bs;
    if (!PyArg_ParseTuple(args, "O!n", &PyDict_Type, &children, &bs))
        return NULL;
    PyObject *names = PyList_New(PyDict_GET_SIZE(children) + 2);
    if (names == NULL)
        return NULL;
    PyObject *dot = PyBytes_FromStringAndSize(".", 1), *dotdot = PyBytes_FromStringAndSize("..", 2);
    if (dot == NULL || dotdot == NULL) {
        Py_XDECREF(dot);
        Py_XDECREF(dotdot);
        Py_DECREF(names);
        return NULL;
    }
    PyList_SET_ITEM(names, 0, dot);
    PyList_SET_ITEM(names, 1, dotdot);
    Py_ssize_t pos = 0, k = 2;
    PyObject *name, *child;
    while (PyDict_Next(children, &pos, &name, &child)) {
        if (!PyBytes_CheckExact(name)) {
            Py_DECREF(names);
            Py_RETURN_NONE;
        }
        Py_INCREF(name);
        PyList_SET_ITEM(names, k++, name);
    }
    if (PyList_Sort(names) < 0) {
        Py_DECREF(names);
        return NULL;
    }
    PyObject *groups = PyList_New(0), *group = NULL, *result = NULL;
    Py_ssize_t n = PyList_GET_SIZE(names), used = 0, start = 0;
    if (groups == NULL)
        goto done;
    for (Py_ssize_t j = 0; j <= n; j++) {
        /* as the pure loop: a name that does not fit closes the group before it (only the
         * first group can be left empty so, by a first name longer than a block) */
        Py_ssize_t need = j < n ? 12 + PyBytes_GET_SIZE(PyList_GET_ITEM(names, j)) : 0;
        if (j == n || used + need > bs) {
            group = PyList_GetSlice(names, start, j);
            if (group == NULL || PyList_Append(groups, group) < 0)
                goto done;
            Py_CLEAR(group);
            if (j == n)
                break;
            start = j;
            used = 0;
        }
        used += need;
    }
    result = Py_BuildValue("(On)", groups, used);
done:
    Py_XDECREF(group);
    Py_XDECREF(groups);
    Py_DECREF(names);
    return result;
}

/* -- file_columns(order, links, ct_sec, ct_nsec, packed_type, heads, layouts, i_us, sizes,
 *                 tables) -> (rest, handled) | None -----------------------------------------
 *
 * The column loop of writer.py `write_metadata` for its most common inode, a file whose
 * data is a `PackedChunks` (what a merge makes of a layer's file) and that has no xattrs:
 * its header bytes (32 when compact: mtime the build time and nlink, size, uid, gid in the
 * compact fields; else 64), layout, i_u, size and chunk table, the values the Python loop
 * gives it. Every other inode, and any whose values are not what this expects, is left in
 * `rest` (indexes in order) for the Python loop; `handled` counts the others. The slots
 * are read by the member offsets of the nodes' (and the PackedChunks') own classes, as
 * the classes' slot descriptors read them; None if those classes are not slotted so. */


static PyObject *file_columns(PyObject *self, PyObject *args) {
    PyObject *order, *links, *ct_sec_o, *ct_nsec_o, *heads, *i_us, *sizes, *tables;
    PyObject *layouts;
    PyTypeObject *packed_type;
    if (!PyArg_ParseTuple(args, "O!O!OOO!O!O!O!O!O!", &PyList_Type, &order, &PyList_Type,
                          &links, &ct_sec_o, &ct_nsec_o, &PyType_Type, &packed_type,
                          &PyList_Type, &heads, &PyByteArray_Type, &layouts, &PyList_Type,
                          &i_us, &PyList_Type, &sizes, &PyList_Type, &tables))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(order);
    long long ct_sec, ct_nsec;
    if (count == 0 || PyList_GET_SIZE(links) < count || PyList_GET_SIZE(heads) < count ||
        PyByteArray_GET_SIZE(layouts) < count || PyList_GET_SIZE(i_us) < count ||
        PyList_GET_SIZE(sizes) < count || PyList_GET_SIZE(tables) < count ||
        get_ll(ct_sec_o, LLONG_MIN, LLONG_MAX, &ct_sec) < 0 ||
        get_ll(ct_nsec_o, LLONG_MIN, LLONG_MAX, &ct_nsec) < 0)
        Py_RETURN_NONE;
    PyTypeObject *node_type = Py_TYPE(PyList_GET_ITEM(order, 0));
    Py_ssize_t o_uid = slot_offset(node_type, "uid"), o_gid = slot_offset(node_type, "gid"),
               o_mtime = slot_offset(node_type, "mtime"),
               o_nsec = slot_offset(node_type, "mtime_nsec"),
               o_size = slot_offset(node_type, "size"), o_data = slot_offset(node_type, "data"),
               o_xattrs = slot_offset(node_type, "xattrs"),
               o_bits = slot_offset(packed_type, "chunkbits"),
               o_table = slot_offset(packed_type, "table");
    if (o_uid < 0 || o_gid < 0 || o_mtime < 0 || o_nsec < 0 || o_size < 0 || o_data < 0 ||
        o_xattrs < 0 || o_bits < 0 || o_table < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *rest = PyList_New(0);
    if (rest == NULL)
        return NULL;
    Py_ssize_t handled = 0;
    unsigned char *lay = (unsigned char *)PyByteArray_AS_STRING(layouts);
    PyObject *head32 = PyLong_FromLong(32), *head64 = PyLong_FromLong(64);
    if (head32 == NULL || head64 == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *node = PyList_GET_ITEM(order, i);
        PyObject *data, *xattrs, *size, *bits_o, *table, *v;
        long long nlink, sz, uid, gid, mtime, nsec, bits;
        if (Py_TYPE(node) != node_type || (data = SLOT(node, o_data)) == NULL ||
            Py_TYPE(data) != packed_type || (xattrs = SLOT(node, o_xattrs)) == NULL ||
            !PyDict_CheckExact(xattrs) || PyDict_GET_SIZE(xattrs) ||
            (size = SLOT(node, o_size)) == NULL || (bits_o = SLOT(data, o_bits)) == NULL ||
            (table = SLOT(data, o_table)) == NULL ||
            get_ll(PyList_GET_ITEM(links, i), LLONG_MIN, LLONG_MAX, &nlink) < 0 ||
            get_ll(size, LLONG_MIN, LLONG_MAX, &sz) < 0 ||
            get_ll(bits_o, 0, 0x7FFFFFFF, &bits) < 0 || (v = SLOT(node, o_uid)) == NULL ||
            get_ll(v, LLONG_MIN, LLONG_MAX, &uid) < 0 || (v = SLOT(node, o_gid)) == NULL ||
            get_ll(v, LLONG_MIN, LLONG_MAX, &gid) < 0 || (v = SLOT(node, o_mtime)) == NULL ||
            get_ll(v, LLONG_MIN, LLONG_MAX, &mtime) < 0 || (v = SLOT(node, o_nsec)) == NULL ||
            get_ll(v, LLONG_MIN, LLONG_MAX, &nsec) < 0) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(rest, index) < 0) {
                Py_XDECREF(index);
                goto fail;
            }
            Py_DECREF(index);
            continue;
        }
        int compact = mtime == ct_sec && nsec == ct_nsec && nlink <= 0xFFFF &&
                      sz <= 0xFFFFFFFFLL && uid <= 0xFFFF && gid <= 0xFFFF;
        PyObject *i_u = PyLong_FromLongLong(bits | 0x20); /* | CHUNK_FORMAT_INDEXES */
        if (i_u == NULL)
            goto fail;
        PyObject *head = compact ? head32 : head64;
        Py_INCREF(head);
        Py_INCREF(size);
        Py_INCREF(table);
        /* each steals the reference given and drops the list's old one (a small int or None) */
        PyList_SetItem(heads, i, head);
        PyList_SetItem(i_us, i, i_u);
        PyList_SetItem(sizes, i, size);
        PyList_SetItem(tables, i, table);
        lay[i] = 4; /* LAYOUT_CHUNK_BASED */
        handled++;
    }
    Py_DECREF(head32);
    Py_DECREF(head64);
    PyObject *result = Py_BuildValue("(Nn)", rest, handled);
    return result;
fail:
    Py_XDECREF(head32);
    Py_XDECREF(head64);
    Py_DECREF(rest);
    return NULL;
}

/* -- common_mtime(order) -> (sec, nsec) | None ------------------------------------------
 *
 * tree.py `pick_build_time(Counter((n.mtime, n.mtime_nsec) for n in order))`: the most
 * common mtime of the nodes, the latest on a tie, counted in a table of this loop's own
 * (a tree has few distinct mtimes). None for an mtime that is not a 64-bit int, or nodes
 * not all of the first one's class. */
typedef struct {
    long long sec, nsec;
    Py_ssize_t count; /* 0: a free slot */
} mtime_slot;

static PyObject *common_mtime(PyObject *self, PyObject *order) {
    if (!PyList_Check(order) || PyList_GET_SIZE(order) == 0)
        Py_RETURN_NONE;
    PyTypeObject *node_type = Py_TYPE(PyList_GET_ITEM(order, 0));
    Py_ssize_t o_mtime = slot_offset(node_type, "mtime"),
               o_nsec = slot_offset(node_type, "mtime_nsec");
    if (o_mtime < 0 || o_nsec < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    size_t mask = 63, used = 0;
    mtime_slot *t = PyMem_Calloc(mask + 1, sizeof(mtime_slot));
    if (t == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = PyList_GET_SIZE(order);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *node = PyList_GET_ITEM(order, i), *a, *b;
        long long sec, nsec;
        if (Py_TYPE(node) != node_type || (a = SLOT(node, o_mtime)) == NULL ||
            (b = SLOT(node, o_nsec)) == NULL || get_ll(a, LLONG_MIN, LLONG_MAX, &sec) < 0 ||
            get_ll(b, LLONG_MIN, LLONG_MAX, &nsec) < 0) {
            PyMem_Free(t);
            Py_RETURN_NONE;
        }
        size_t h = ((size_t)sec * 0x9E3779B97F4A7C15ULL) ^ (size_t)nsec;
        size_t j = (h ^ (h >> 29)) & mask;
        while (t[j].count && (t[j].sec != sec || t[j].nsec != nsec))
            j = (j + 1) & mask;
        if (t[j].count == 0) {
            t[j].sec = sec;
            t[j].nsec = nsec;
            if (++used * 2 > mask + 1) { /* grow, keeping the load under a half */
                size_t size = (mask + 1) * 2;
                mtime_slot *g = PyMem_Calloc(size, sizeof(mtime_slot));
                if (g == NULL) {
                    PyMem_Free(t);
                    return PyErr_NoMemory();
                }
                t[j].count = 1;
                for (size_t k = 0; k <= mask; k++) {
                    if (!t[k].count)
                        continue;
                    size_t hk = ((size_t)t[k].sec * 0x9E3779B97F4A7C15ULL) ^ (size_t)t[k].nsec;
                    size_t m = (hk ^ (hk >> 29)) & (size - 1);
                    while (g[m].count)
                        m = (m + 1) & (size - 1);
                    g[m] = t[k];
                }
                PyMem_Free(t);
                t = g;
                mask = size - 1;
                continue;
            }
        }
        t[j].count++;
    }
    mtime_slot best = {0, 0, 0};
    for (size_t k = 0; k <= mask; k++) {
        mtime_slot *c = &t[k];
        if (c->count > best.count ||
            (c->count == best.count && c->count &&
             (c->sec > best.sec || (c->sec == best.sec && c->nsec > best.nsec))))
            best = *c;
    }
    PyMem_Free(t);
    return Py_BuildValue("(LL)", best.sec, best.nsec);
}

static PyMethodDef methods[] = {
    {"layout_inode_table", layout_inode_table, METH_VARARGS,
     "layout_inode_table(heads, tables, tails, meta_start, base, block_size) -> "
     "(nids, end) | None"},
    {"pack_inode_table", pack_inode_table, METH_VARARGS,
     "pack_inode_table(meta, order, nids, heads, layouts, links, sizes, i_us, xbodies, "
     "tables, tails, offset) -> bool"},
    {"pack_dir_blocks", pack_dir_blocks, METH_VARARGS,
     "pack_dir_blocks(groups, children, nid_of, own_nid, parent_nid) -> list | None"},
    {"walk_tree", walk_tree, METH_O, "walk_tree(root) -> (order, links, parents) | None"},
    {"dir_block_plan", dir_block_plan, METH_VARARGS,
     "dir_block_plan(children, block_size) -> (groups, last_used) | None"},
    {"common_mtime", common_mtime, METH_O, "common_mtime(order) -> (sec, nsec) | None"},
    {"file_columns", file_columns, METH_VARARGS,
     "file_columns(order, links, ct_sec, ct_nsec, packed_type, heads, layouts, i_us, sizes, "
     "tables) -> (rest, handled) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_mergepack",
    "The metadata writer's compiled loops (optional; see snapshotter/erofs/format.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__mergepack(void) {
    if ((s_mode = PyUnicode_InternFromString("mode")) == NULL ||
        (s_uid = PyUnicode_InternFromString("uid")) == NULL ||
        (s_gid = PyUnicode_InternFromString("gid")) == NULL ||
        (s_mtime = PyUnicode_InternFromString("mtime")) == NULL ||
        (s_mtime_nsec = PyUnicode_InternFromString("mtime_nsec")) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
