/*
 * The log decoder in C: the twin of LogScan.records and LogScan._one (mpwal/_format.py), which
 * are the reference. The record layout is the one _format.py's docstring gives; every integer
 * little-endian, the CRC zlib's crc32.
 *
 *   scan_log(buf, start, expect_id, max_records, max_bytes, Op, Record)
 *           -> (records, end, problem, problem_record)
 *       Decodes the records of `buf` (any buffer) from offset `start` on, as LogScan.records'
 *       loop does: each a Record(record_id, ops, start, end) whose ops are Op tuples, built as
 *       the reference builds them (Op and Record are _format's classes, passed in). `expect_id`
 *       is the id the first record must have, or None for any; each next record must have the
 *       previous one's plus one. `records` is the list of good records, `end` the offset just
 *       past the last of them (`start` when none). The scan stops at the end of the buffer
 *       (problem None), at the first record that is not whole (problem "torn", "crc" or
 *       "bad type"; problem_record its id once its BEGIN is whole, else None), at a record out
 *       of sequence (problem "out of sequence", problem_record its id), or, with problem None,
 *       once it holds `max_records` records or records of `max_bytes` bytes or more: the caller
 *       (LogScan.records, a generator) then asks again from `end`, so a consumer that stops
 *       early has not made the whole log decoded.
 *
 * Every length comes from the file (hostile, truncated or random bytes): each bound is checked
 * against what is left of the buffer (`n - pos`, which cannot wrap because pos <= n) before a
 * byte is read, so no input reads out of bounds; the worst is "torn".
 */
#include "_native.h"
#include <string.h>
#include <zlib.h>

/* zlib.crc32 releases the GIL over more than 5 KiB; here only over a record this long (the
 * enactor is a thread of the writer process: its readers go on meanwhile) */
#define CRC_NOGIL_BYTES (256u << 10)

/* Little-endian loads; the caller checked that the bytes are inside the buffer. */
static inline uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static inline uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static inline unsigned popcount64(uint64_t v) {
    unsigned c = 0;
    for (; v; v &= v - 1) c++;
    return c;
}

/* zlib's crc32 of len bytes, in parts its uInt holds. */
static uint32_t crc_of(const unsigned char *p, size_t len) {
    uLong crc = crc32(0L, Z_NULL, 0);
    while (len) {
        uInt part = len > (1u << 30) ? (1u << 30) : (uInt)len;
        crc = crc32(crc, p, part);
        p += part;
        len -= part;
    }
    return (uint32_t)crc;
}

/* An instance of the tuple subclass `type` (a NamedTuple: Op, Record) holding `items`, which
 * it steals (all of them, also on failure; none may be NULL): what tuple.__new__(type, items)
 * makes. Before 3.14, as CPython's tuple_subtype_new does: tp_alloc, then the items. From 3.14
 * on a tuple caches its hash in a field of its struct that only tuple's own constructor sets,
 * so there this calls that constructor. */
static PyObject *new_tuple(PyTypeObject *type, PyObject **items, Py_ssize_t n) {
#if PY_VERSION_HEX < 0x030E0000
    PyObject *t = type->tp_alloc(type, n);
    if (!t) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, items[i]);
    return t;
#else
    PyObject *plain = PyTuple_New(n), *args, *t;
    if (!plain) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(plain, i, items[i]);
    args = PyTuple_Pack(1, plain);
    Py_DECREF(plain);
    if (!args) return NULL;
    t = PyTuple_Type.tp_new(type, args, NULL);
    Py_DECREF(args);
    return t;
#endif
fail:
    for (Py_ssize_t i = 0; i < n; i++) Py_DECREF(items[i]);
    return NULL;
}

/* Op(kind, table, key, mask, data), stealing `data` (NULL: a failure already raised).
 *
 * The one way it differs from the reference's: it is not tracked by the garbage collector. An
 * Op holds ints, bytes and None only, so it can be in no reference cycle; the collector itself
 * stops tracking a plain tuple of such items the first time it sees one, but never a tuple
 * subclass's. A log's ops are most of the objects a scan makes, and a batch of records lives
 * through several collections: tracked, they are traversed by each, which costs more than
 * decoding them (a 64 MiB log of 100-byte values: 140 ms tracked, 55 untracked). */
static PyObject *new_op(PyTypeObject *op_type, long kind, unsigned table, uint64_t key,
                        uint64_t mask, PyObject *data) {
    if (!data) return NULL;
    PyObject *items[5] = {PyLong_FromLong(kind), PyLong_FromUnsignedLong(table),
                          PyLong_FromUnsignedLongLong(key), PyLong_FromUnsignedLongLong(mask),
                          data};
    if (!items[0] || !items[1] || !items[2] || !items[3]) {
        for (int i = 0; i < 5; i++) Py_XDECREF(items[i]);
        return NULL;
    }
    PyObject *op = new_tuple(op_type, items, 5);
    if (op && PyObject_GC_IsTracked(op)) PyObject_GC_UnTrack(op);
    return op;
}

/* Why a record is not whole (the reference's _stop): its reason and, when known, its id. */
typedef struct {
    const char *why;
    int has_id;
    uint64_t id;
} Stop;

/* The record at `start` (start < n), as LogScan._one decodes it: 1, *out its Record and *end
 * the offset past it; 0 and *stop why it is not whole; -1 with an exception (MemoryError) set. */
static int decode_one(const unsigned char *b, size_t n, size_t start, PyTypeObject *op_type,
                      PyTypeObject *record_type, PyObject **out, size_t *end, Stop *stop) {
    stop->has_id = 0;
    if (b[start] != BEGIN_RECORD) {
        stop->why = "bad type";
        return 0;
    }
    if (n - start < BEGIN_SIZE) {
        stop->why = "torn";
        return 0;
    }
    uint64_t rid = le64(b + start + 1);
    stop->has_id = 1;
    stop->id = rid;
    size_t pos = start + BEGIN_SIZE; /* <= n */
    PyObject *ops = PyList_New(0), *op;
    if (!ops) return -1;
    for (;;) {
        if (pos >= n) goto torn;
        size_t left = n - pos; /* >= 1 bytes from pos on */
        switch (b[pos]) {
        case INSERT_VALUE: {
            if (left < VALUE_SIZE) goto torn;
            unsigned table = le16(b + pos + 1);
            uint64_t index = le64(b + pos + 3);
            uint32_t length = le32(b + pos + 11);
            pos += VALUE_SIZE;
            if (length == REMOVED) {
                op = new_op(op_type, INSERT_VALUE, table, index, 0, Py_NewRef(Py_None));
            } else {
                if (length > n - pos) goto torn;
                op = new_op(op_type, INSERT_VALUE, table, index, 0,
                            PyBytes_FromStringAndSize((const char *)b + pos, (Py_ssize_t)length));
                pos += length;
            }
            break;
        }
        case INSERT_INDEX: {
            if (left < INDEX_SIZE) goto torn;
            unsigned table = le16(b + pos + 1);
            uint64_t chunk = le64(b + pos + 3), mask = le64(b + pos + 11);
            pos += INDEX_SIZE;
            size_t size = (size_t)popcount64(mask) * ENTRY_BYTES; /* at most 512 */
            if (size > n - pos) goto torn;
            op = new_op(op_type, INSERT_INDEX, table, chunk, mask,
                        PyBytes_FromStringAndSize((const char *)b + pos, (Py_ssize_t)size));
            pos += size;
            break;
        }
        case DROP_TABLE:
            if (left < DROP_SIZE) goto torn;
            op = new_op(op_type, DROP_TABLE, le16(b + pos + 1), 0, 0, Py_NewRef(Py_None));
            pos += DROP_SIZE;
            break;
        case END_RECORD: {
            if (left < END_SIZE) goto torn;
            uint32_t want = le32(b + pos + 1), got;
            size_t len = pos + 1 - start; /* BEGIN's type byte through END's */
            if (len >= CRC_NOGIL_BYTES) {
                Py_BEGIN_ALLOW_THREADS
                got = crc_of(b + start, len);
                Py_END_ALLOW_THREADS
            } else {
                got = crc_of(b + start, len);
            }
            if (got != want) {
                Py_DECREF(ops);
                stop->why = "crc";
                return 0;
            }
            PyObject *items[4] = {PyLong_FromUnsignedLongLong(rid), ops,
                                  PyLong_FromSize_t(start), PyLong_FromSize_t(pos + END_SIZE)};
            if (!items[0] || !items[2] || !items[3]) {
                for (int i = 0; i < 4; i++) Py_XDECREF(items[i]);
                return -1;
            }
            *out = new_tuple(record_type, items, 4);
            *end = pos + END_SIZE;
            return *out ? 1 : -1;
        }
        default:
            Py_DECREF(ops);
            stop->why = "bad type";
            return 0;
        }
        if (!op) goto fail;
        int r = PyList_Append(ops, op);
        Py_DECREF(op);
        if (r < 0) goto fail;
    }
torn:
    Py_DECREF(ops);
    stop->why = "torn";
    return 0;
fail:
    Py_DECREF(ops);
    return -1;
}

static int is_tuple_type(PyObject *o) {
    return PyType_Check(o) && PyType_IsSubtype((PyTypeObject *)o, &PyTuple_Type);
}

/* scan_log(buf, start, expect_id, max_records, max_bytes, Op, Record) (see the top) */
static PyObject *scan_log(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 7 || !is_tuple_type(args[5]) || !is_tuple_type(args[6])) {
        PyErr_SetString(PyExc_TypeError, "scan_log(buf, start, expect_id, max_records, "
                                         "max_bytes, Op, Record), Op and Record tuple types");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t max_records = PyLong_AsSsize_t(args[3]);
    if (max_records == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[4]);
    if (max_bytes == -1 && PyErr_Occurred()) return NULL;
    if (start < 0 || max_records < 1 || max_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "scan_log: start >= 0, max_records and max_bytes >= 1");
        return NULL;
    }
    /* the id the next record must have: none (expect_id None), or `expect`, or one no u64 is
     * (an expect_id outside 0..2**64-1, or the id after 2**64-1) */
    int check = 0, impossible = 0;
    uint64_t expect = 0;
    if (args[2] != Py_None) {
        if (!PyLong_Check(args[2])) {
            PyErr_SetString(PyExc_TypeError, "scan_log: expect_id must be an int or None");
            return NULL;
        }
        check = 1;
        expect = PyLong_AsUnsignedLongLong(args[2]);
        if (expect == (uint64_t)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
            PyErr_Clear();
            impossible = 1;
        }
    }
    PyTypeObject *op_type = (PyTypeObject *)args[5], *record_type = (PyTypeObject *)args[6];
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *b = (const unsigned char *)view.buf;
    size_t n = (size_t)view.len, pos = (size_t)start, first = pos;
    PyObject *records = PyList_New(0), *result = NULL, *why = NULL, *rid_o = NULL, *end_o = NULL;
    Stop stop = {NULL, 0, 0};
    if (!records) goto done;
    while (pos < n && PyList_GET_SIZE(records) < max_records && pos - first < (size_t)max_bytes) {
        PyObject *rec;
        size_t end;
        int got = decode_one(b, n, pos, op_type, record_type, &rec, &end, &stop);
        if (got < 0) goto done;
        if (!got) break;
        uint64_t rid = stop.id; /* a whole record: its id */
        if (check && (impossible || rid != expect)) {
            Py_DECREF(rec);
            stop.why = "out of sequence";
            break;
        }
        check = 1;
        impossible = rid == UINT64_MAX; /* no next id */
        expect = rid + !impossible;
        int r = PyList_Append(records, rec);
        Py_DECREF(rec);
        if (r < 0) goto done;
        pos = end;
    }
    why = stop.why ? PyUnicode_FromString(stop.why) : Py_NewRef(Py_None);
    rid_o = stop.why && stop.has_id ? PyLong_FromUnsignedLongLong(stop.id) : Py_NewRef(Py_None);
    end_o = PyLong_FromSize_t(pos);
    if (why && rid_o && end_o) result = PyTuple_Pack(4, records, end_o, why, rid_o);
done:
    Py_XDECREF(why);
    Py_XDECREF(rid_o);
    Py_XDECREF(end_o);
    Py_XDECREF(records);
    PyBuffer_Release(&view);
    return result;
}

PyMethodDef mpwal_log_methods[] = {
    {"scan_log", (PyCFunction)(void (*)(void))scan_log, METH_FASTCALL,
     "scan_log(buf, start, expect_id, max_records, max_bytes, Op, Record) -> (records, end, "
     "problem, problem_record): LogScan.records' loop (mpwal/_format.py)"},
    {NULL, NULL, 0, NULL},
};
