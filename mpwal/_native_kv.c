/*
 * The key-value layer's lookups (mpwal/kv/_column.py is the reference, mpwal/kv/_layout.py the
 * spec of the formats): matching a key's partial hash against an index chunk's 64 entries, and
 * a WHOLE slot's key check. Both read only the bytes they are given.
 */
#include "_native.h"
#include <string.h>

#define CHUNK_ENTRIES KV_CHUNK_ENTRIES
#define TIER_BITS KV_TIER_BITS
#define MIN_INDEX_BITS KV_MIN_INDEX_BITS
#define MAX_INDEX_BITS KV_MAX_INDEX_BITS
#define KIND_WHOLE KV_WHOLE
#define WHOLE_HEAD KV_WHOLE_HEAD

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* kv_matches(chunk, bits, partial) -> tuple of (entry number, slot, tier): the twin of
 * _column.matches, the entries of a 512-byte chunk of a `bits`-bit index that are not empty
 * and whose partial key is `partial`, in entry order. */
static PyObject *kv_matches(PyObject *module, PyObject *args) {
    Py_buffer chunk;
    unsigned bits;
    unsigned long long partial;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*IK", &chunk, &bits, &partial)) return NULL;
    PyObject *out = NULL;
    if (chunk.len != CHUNK_ENTRIES * ENTRY_BYTES || bits < MIN_INDEX_BITS || bits > MAX_INDEX_BITS) {
        PyErr_SetString(PyExc_ValueError, "a 512-byte chunk of an index of 4 to 30 bits");
        goto done;
    }
    unsigned address_bits = bits + 6 + TIER_BITS; /* < 64 */
    uint64_t address_mask = ((uint64_t)1 << address_bits) - 1;
    PyObject *found[CHUNK_ENTRIES];
    Py_ssize_t n = 0;
    for (int e = 0; e < CHUNK_ENTRIES; e++) {
        uint64_t v = le64((const unsigned char *)chunk.buf + e * ENTRY_BYTES);
        if (!v || v >> address_bits != partial) continue;
        uint64_t address = v & address_mask;
        PyObject *t = Py_BuildValue("(iKK)", e, (unsigned long long)(address >> TIER_BITS),
                                    (unsigned long long)(address & ((1u << TIER_BITS) - 1)));
        if (!t) {
            while (n) Py_DECREF(found[--n]);
            goto done;
        }
        found[n++] = t;
    }
    out = PyTuple_New(n);
    if (!out) {
        while (n) Py_DECREF(found[--n]);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(out, i, found[i]);
done:
    PyBuffer_Release(&chunk);
    return out;
}

/* kv_whole(data, key) -> bytes or None: the twin of _column.whole_value, the value of a WHOLE
 * slot (kind, key_len u16, key, value) if its key is `key`, else None; ValueError if the slot
 * is not a WHOLE one or its key runs past its end (torn). */
static PyObject *kv_whole(PyObject *module, PyObject *args) {
    Py_buffer data, key;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*y*", &data, &key)) return NULL;
    PyObject *out = NULL;
    const unsigned char *p = data.buf;
    if (data.len < WHOLE_HEAD || p[0] != KIND_WHOLE) {
        PyErr_SetString(PyExc_ValueError, "not a WHOLE slot");
        goto done;
    }
    Py_ssize_t klen = (Py_ssize_t)p[1] | (Py_ssize_t)p[2] << 8;
    if (WHOLE_HEAD + klen > data.len) {
        PyErr_SetString(PyExc_ValueError, "a WHOLE slot whose key runs past its end");
        goto done;
    }
    if (klen != key.len || memcmp(p + WHOLE_HEAD, key.buf, (size_t)klen) != 0) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    out = PyBytes_FromStringAndSize((const char *)p + WHOLE_HEAD + klen,
                                    data.len - WHOLE_HEAD - klen);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    return out;
}

PyMethodDef mpwal_kv_methods[] = {
    {"kv_matches", kv_matches, METH_VARARGS,
     "kv_matches(chunk, bits, partial) -> ((entry, slot, tier), ...)"},
    {"kv_whole", kv_whole, METH_VARARGS, "kv_whole(data, key) -> value or None"},
    {NULL, NULL, 0, NULL},
};
