/*
 * The applier's slot packing in C: the twin of _applier.slot_runs (mpwal/_applier.py), which is
 * the reference. The value-table file layout is the one _tables.py's docstring gives: slot i at
 * offset i * (4 + slot_size), a u32 `stored` (0: empty, else the value's length + 1), then the
 * value padded with zeros to slot_size bytes; little-endian.
 *
 *   slot_runs(values, slot_sizes) -> [(table, first index, bytes), ...]
 *       `values` {(table, index): bytes or None (empty)}, `slot_sizes` {table: slot_size}:
 *       the slots' bytes, consecutive indices of a table joined into one run (one pwrite), in
 *       order of (table, index). A table missing from slot_sizes raises KeyError (the caller
 *       reloads its catalog); a value longer than its slot raises ValueError.
 */
#include "_native.h"
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t table, index;
    PyObject *data; /* a reference of its own: an allocation below may run a garbage
                     * collection, whose finalizers could change the values dict */
} Slot;

static int by_key(const void *a, const void *b) {
    const Slot *x = a, *y = b;
    if (x->table != y->table) return x->table < y->table ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

static int as_index(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* The bytes of slots[i..j) (consecutive indices of one table), slot_size bytes of data each. */
static PyObject *pack(const Slot *slots, Py_ssize_t i, Py_ssize_t j, Py_ssize_t slot_size) {
    PyObject *buf = PyBytes_FromStringAndSize(NULL, (j - i) * (4 + slot_size));
    if (!buf) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(buf);
    for (; i < j; i++, p += 4 + slot_size) {
        Py_ssize_t len = slots[i].data == Py_None ? -1 : PyBytes_GET_SIZE(slots[i].data);
        uint32_t stored = (uint32_t)(len + 1);
        for (int b = 0; b < 4; b++) p[b] = (unsigned char)(stored >> (8 * b));
        if (len > 0) memcpy(p + 4, PyBytes_AS_STRING(slots[i].data), (size_t)len);
        memset(p + 4 + (len > 0 ? len : 0), 0, (size_t)(slot_size - (len > 0 ? len : 0)));
    }
    return buf;
}

static PyObject *slot_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "slot_runs(values: dict, slot_sizes: dict)");
        return NULL;
    }
    PyObject *values = args[0], *sizes = args[1], *k, *d, *out = NULL;
    Py_ssize_t n = PyDict_GET_SIZE(values), pos = 0, m = 0;
    Slot *slots = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Slot));
    if (!slots) return PyErr_NoMemory();
    while (PyDict_Next(values, &pos, &k, &d)) {
        if (!PyTuple_Check(k) || PyTuple_GET_SIZE(k) != 2 || (d != Py_None && !PyBytes_Check(d))) {
            PyErr_SetString(PyExc_TypeError, "values maps (table, index) to bytes or None");
            goto done;
        }
        if (as_index(PyTuple_GET_ITEM(k, 0), &slots[m].table) < 0 ||
            as_index(PyTuple_GET_ITEM(k, 1), &slots[m].index) < 0)
            goto done;
        slots[m++].data = Py_NewRef(d);
    }
    qsort(slots, (size_t)m, sizeof(Slot), by_key);
    out = PyList_New(0);
    if (!out) goto done;
    for (Py_ssize_t i = 0, j; i < m; i = j) {
        PyObject *tid = PyLong_FromUnsignedLongLong(slots[i].table);
        if (!tid) goto fail;
        PyObject *so = PyDict_GetItemWithError(sizes, tid);
        if (!so) {
            if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, tid);
            Py_DECREF(tid);
            goto fail;
        }
        Py_ssize_t slot_size = PyLong_AsSsize_t(so);
        if (slot_size < 1 || slot_size > (1 << 26)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a slot_size is 1..2**26");
            Py_DECREF(tid);
            goto fail;
        }
        for (j = i; j < m && slots[j].table == slots[i].table &&
                    slots[j].index - slots[i].index == (uint64_t)(j - i); j++) {
            if (slots[j].data != Py_None && PyBytes_GET_SIZE(slots[j].data) > slot_size) {
                PyErr_Format(PyExc_ValueError, "a %zd-byte value does not fit a %zd-byte slot",
                             PyBytes_GET_SIZE(slots[j].data), slot_size);
                Py_DECREF(tid);
                goto fail;
            }
        }
        PyObject *buf = pack(slots, i, j, slot_size), *run = NULL;
        if (buf) run = Py_BuildValue("(NKN)", tid, (unsigned long long)slots[i].index, buf);
        else Py_DECREF(tid);
        if (!run || PyList_Append(out, run) < 0) {
            Py_XDECREF(run);
            goto fail;
        }
        Py_DECREF(run);
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    for (Py_ssize_t i = 0; i < m; i++) Py_DECREF(slots[i].data);
    PyMem_Free(slots);
    return out;
}

PyMethodDef mpwal_tables_methods[] = {
    {"slot_runs", (PyCFunction)(void (*)(void))slot_runs, METH_FASTCALL,
     "slot_runs(values, slot_sizes) -> [(table, first, bytes)]: the applier's slot packing"},
    {NULL, NULL, 0, NULL},
};
