/*
 * The writer's intake in C: the twins of ChangeSet.insert_values's loop (mpwal/_record.py) and
 * of encode_record (mpwal/_format.py), which are the reference. The record layout is the one
 * _format.py's docstring gives; every integer little-endian, the CRC zlib's crc32.
 *
 *   gather(values, table, pairs, limit, slot_size) -> bool
 *       The common case of insert_values: `pairs` a list or tuple of (index, data) tuples, each
 *       index an int in 0..limit-1, each data bytes of at most slot_size bytes or None. Then
 *       every pair goes into the dict `values` as (table, index) -> data, in order, and the
 *       answer is True. If any pair is not of that kind nothing is stored and the answer is
 *       False: the Python loop then runs over the same pairs and raises the error that says
 *       what is wrong (or converts a bytearray), so both backends give the same messages.
 *
 *   encode(record_id, drops, chunks, values) -> bytes
 *       The log record, byte for byte what encode_record lays out: drops (table ids), chunks
 *       {(table, chunk): [mask, {entry: u64}]}, values {(table, index): bytes or None}.
 *
 * Neither touches shared memory. Both only read their arguments (gather writes `values` only
 * once every pair has passed), so a failure leaves the record as it was.
 */
#include "_native.h"
#include <string.h>
#include <zlib.h>

/* -- gather ------------------------------------------------------------------------------- */

static PyObject *gather(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "gather(values: dict, table, pairs, limit, slot_size)");
        return NULL;
    }
    PyObject *values = args[0], *table = args[1];
    if (!PyList_Check(args[2]) && !PyTuple_Check(args[2])) Py_RETURN_FALSE;
    long long limit = PyLong_AsLongLong(args[3]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t slot_size = PyLong_AsSsize_t(args[4]);
    if (slot_size == -1 && PyErr_Occurred()) return NULL;
    /* a tuple of the pairs: what is checked is what is stored, whatever runs meanwhile (a
     * garbage collection's finalizer could change a list) */
    PyObject *pairs = PySequence_Tuple(args[2]);
    if (!pairs) return NULL;
    PyObject *answer = Py_False;
    Py_ssize_t n = PyTuple_GET_SIZE(pairs);
    /* first check every pair, storing nothing: all or nothing, as the reference */
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, k);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) goto done;
        PyObject *index = PyTuple_GET_ITEM(pair, 0), *data = PyTuple_GET_ITEM(pair, 1);
        if (!PyLong_CheckExact(index)) goto done; /* bool, int subclasses: the slow path */
        int overflow;
        long long i = PyLong_AsLongLongAndOverflow(index, &overflow);
        if (overflow || i < 0 || i >= limit) goto done;
        if (data != Py_None && (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) > slot_size))
            goto done;
    }
    /* then store them, in order (a later pair for the same index wins, as in a dict update) */
    answer = NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, k);
        PyObject *key = PyTuple_Pack(2, table, PyTuple_GET_ITEM(pair, 0));
        if (!key) goto done;
        /* two ints: no cycle can pass through it, so the garbage collector need not track it
         * (as its own untracking of such tuples would decide); then the record's dict, and the
         * writer's dict of keys that takes these tuples, stay untracked too, and full
         * collections do not walk every key the overlay holds */
        if (PyObject_GC_IsTracked(key)) PyObject_GC_UnTrack(key);
        int r = PyDict_SetItem(values, key, PyTuple_GET_ITEM(pair, 1));
        Py_DECREF(key);
        if (r < 0) goto done; /* MemoryError: the pairs stored so far stay (a record of ints) */
    }
    answer = Py_True;
done:
    Py_DECREF(pairs);
    Py_XINCREF(answer);
    return answer;
}

/* -- encode ------------------------------------------------------------------------------- */

static inline unsigned char *put_u16(unsigned char *p, uint64_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    return p + 2;
}

static inline unsigned char *put_u32(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
    return p + 4;
}

static inline unsigned char *put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
    return p + 8;
}

/* An int in 0..max into *out; -1 with OverflowError (or TypeError) set otherwise. */
static int as_uint(PyObject *o, uint64_t max, const char *what, uint64_t *out) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", what);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (v > max) {
        PyErr_Format(PyExc_OverflowError, "%s %llu does not fit the log format", what, v);
        return -1;
    }
    *out = v;
    return 0;
}

/* (table, key) of a chunks or values dict key into *table, *key. */
static int split_key(PyObject *k, uint64_t *table, uint64_t *key) {
    if (!PyTuple_Check(k) || PyTuple_GET_SIZE(k) != 2) {
        PyErr_SetString(PyExc_TypeError, "a key is a (table, index) tuple");
        return -1;
    }
    if (as_uint(PyTuple_GET_ITEM(k, 0), 0xFFFF, "table", table) < 0) return -1;
    return as_uint(PyTuple_GET_ITEM(k, 1), UINT64_MAX, "index", key);
}

/* The [mask, {entry: u64}] of a chunk into *mask and *entries (borrowed). */
static int split_chunk(PyObject *c, uint64_t *mask, PyObject **entries) {
    if (!PyList_Check(c) || PyList_GET_SIZE(c) != 2 || !PyDict_Check(PyList_GET_ITEM(c, 1))) {
        PyErr_SetString(PyExc_TypeError, "a chunk's change is [mask, {entry: value}]");
        return -1;
    }
    *entries = PyList_GET_ITEM(c, 1);
    return as_uint(PyList_GET_ITEM(c, 0), UINT64_MAX, "mask", mask);
}

static PyObject *encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4 || !PyList_Check(args[1]) || !PyDict_Check(args[2]) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "encode(record_id, drops: list, chunks: dict, values: dict)");
        return NULL;
    }
    PyObject *drops = args[1], *chunks = args[2], *values = args[3];
    uint64_t record_id, t, key, mask, v;
    if (as_uint(args[0], UINT64_MAX, "record_id", &record_id) < 0) return NULL;

    /* the size first, checking every type on the way */
    Py_ssize_t drop_n = PyList_GET_SIZE(drops), size = BEGIN_SIZE + DROP_SIZE * drop_n + END_SIZE;
    Py_ssize_t pos = 0;
    PyObject *k, *c, *d;
    while (PyDict_Next(chunks, &pos, &k, &c)) {
        PyObject *entries;
        if (split_key(k, &t, &key) < 0 || split_chunk(c, &mask, &entries) < 0) return NULL;
        size += INDEX_SIZE + ENTRY_BYTES * __builtin_popcountll(mask);
    }
    pos = 0;
    while (PyDict_Next(values, &pos, &k, &d)) {
        if (split_key(k, &t, &key) < 0) return NULL;
        if (d == Py_None) {
            size += VALUE_SIZE;
        } else if (PyBytes_Check(d)) {
            if ((uint64_t)PyBytes_GET_SIZE(d) >= REMOVED) {
                PyErr_SetString(PyExc_OverflowError, "a value of 4 GiB or more does not fit the log");
                return NULL;
            }
            if (size > PY_SSIZE_T_MAX - VALUE_SIZE - PyBytes_GET_SIZE(d)) return PyErr_NoMemory();
            size += VALUE_SIZE + PyBytes_GET_SIZE(d);
        } else {
            PyErr_SetString(PyExc_TypeError, "a value is bytes or None");
            return NULL;
        }
    }

    PyObject *out = PyBytes_FromStringAndSize(NULL, size), *chunk_items = NULL, *held = NULL;
    if (!out) return NULL;
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(out), *p = base, *end = base + size;
/* room for n more bytes, checked before each entry is written: the sizes above hold unless
 * Python code ran meanwhile and changed a dict (only a hostile key's __eq__ could) */
#define ROOM(n) do { if ((Py_ssize_t)(n) > end - p) goto changed; } while (0)
    *p++ = BEGIN_RECORD;
    p = put_u64(p, record_id);
    for (Py_ssize_t i = 0; i < drop_n; i++) {
        if (as_uint(PyList_GET_ITEM(drops, i), 0xFFFF, "table", &t) < 0) goto fail;
        ROOM(DROP_SIZE);
        *p++ = DROP_TABLE;
        p = put_u16(p, t);
    }
    /* the chunks from a snapshot of their items, each chunk's entries dict held: a lookup in
     * it may run Python code (an int subclass's __eq__) that changes the record's dicts */
    chunk_items = PyDict_Items(chunks);
    if (!chunk_items) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(chunk_items); i++) {
        PyObject *item = PyList_GET_ITEM(chunk_items, i), *entries;
        k = PyTuple_GET_ITEM(item, 0);
        c = PyTuple_GET_ITEM(item, 1);
        if (split_key(k, &t, &key) < 0 || split_chunk(c, &mask, &entries) < 0) goto fail;
        Py_XSETREF(held, Py_NewRef(entries));
        ROOM(INDEX_SIZE + ENTRY_BYTES * __builtin_popcountll(mask));
        *p++ = INSERT_INDEX;
        p = put_u16(p, t);
        p = put_u64(p, key);
        p = put_u64(p, mask);
        for (int e = 0; e < 64; e++) { /* the changed entries, lowest first */
            if (!(mask >> e & 1)) continue;
            PyObject *eo = PyLong_FromLong(e);
            if (!eo) goto fail;
            PyObject *vo = PyDict_GetItemWithError(held, eo);
            Py_DECREF(eo);
            if (!vo) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_KeyError, "entry %d is in the mask but has no value", e);
                goto fail;
            }
            if (as_uint(vo, UINT64_MAX, "an index entry", &v) < 0) goto fail;
            p = put_u64(p, v);
        }
    }
    pos = 0;
    while (PyDict_Next(values, &pos, &k, &d)) {
        if (split_key(k, &t, &key) < 0) goto fail;
        if (d != Py_None && !PyBytes_Check(d)) goto changed;
        ROOM(VALUE_SIZE + (d == Py_None ? 0 : PyBytes_GET_SIZE(d)));
        *p++ = INSERT_VALUE;
        p = put_u16(p, t);
        p = put_u64(p, key);
        if (d == Py_None) {
            p = put_u32(p, REMOVED);
        } else {
            Py_ssize_t len = PyBytes_GET_SIZE(d);
            p = put_u32(p, (uint64_t)len);
            memcpy(p, PyBytes_AS_STRING(d), (size_t)len);
            p += len;
        }
    }
    ROOM(END_SIZE);
    *p++ = END_RECORD;
    /* the CRC of every byte from BEGIN_RECORD through END_RECORD, in chunks zlib's uInt holds */
    uLong crc = crc32(0L, Z_NULL, 0);
    for (const unsigned char *q = base; q < p;) {
        uInt part = (uInt)((p - q) > (1 << 30) ? (1 << 30) : (p - q));
        crc = crc32(crc, q, part);
        q += part;
    }
    p = put_u32(p, crc);
    if (p == end) {
        Py_XDECREF(held);
        Py_DECREF(chunk_items);
        return out;
    }
changed:
    PyErr_SetString(PyExc_RuntimeError, "a record's changes changed while it was encoded");
fail:
    Py_XDECREF(held);
    Py_XDECREF(chunk_items);
    Py_DECREF(out);
    return NULL;
#undef ROOM
}

PyMethodDef mpwal_record_methods[] = {
    {"gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL,
     "gather(values, table, pairs, limit, slot_size) -> bool: insert_values's common case"},
    {"encode", (PyCFunction)(void (*)(void))encode, METH_FASTCALL,
     "encode(record_id, drops, chunks, values) -> bytes: the log record (encode_record)"},
    {NULL, NULL, 0, NULL},
};
