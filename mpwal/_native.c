/*
 * mpwal._native: the readers' overlay lookups in C, the twin of _make_lookups in
 * mpwal/_overlay.py, which is the reference (same names, same answers, same layout).
 *
 * The layout and the memory-ordering contract are written at the top of _overlay.py. Here
 * every word a reader loads from shared memory is an acquire load (C11 atomics), in the
 * order the contract gives: struct, committed, the slot's tag then index and head, the
 * version node's words, enacting, struct again; the last two after an acquire fence, so the
 * data copied and the table file read before them are read before them (a seqlock reader's
 * fence). The header words the Python code stores and loads go through store_release,
 * store_fenced and load_acquire below. A word index outside the segment raises
 * IndexError and a chain whose record ids do not fall raises Torn: both mean the lookup
 * walked bytes a structural change freed, and the caller retries (as in Python).
 *
 * One object per mapped segment: Lookups(mapping, shift, slots_end, torn, miss, retry,
 * read_value, limits, slow). It holds a read-only buffer of the mapping for its life.
 */
#include "_native.h"
#include <stdatomic.h>
#include <string.h>

#define HEADER_WORDS 512
#define SLOT_WORDS 4
#define NODE_WORDS 4 /* record_id, loc, older, newer */
#define NODE_BYTES (NODE_WORDS * 8)
#define W_STRUCT 0
#define W_COMMITTED 7
#define W_NDROPS 15
#define W_ENACTING 16
#define DROP_BASE 64
#define MAX_DROPS 128
#define HASH_K 0x9E3779B97F4A7C15ULL

typedef struct {
    PyObject_HEAD
    Py_buffer view;       /* the segment's mapping, read only */
    const uint64_t *q;    /* its words */
    Py_ssize_t nwords;
    unsigned shift;       /* 64 - log2(nslots) */
    Py_ssize_t slots_end; /* word just past the slots */
    PyObject *torn;       /* the Torn exception class */
    PyObject *miss;       /* the MISS sentinel */
    PyObject *retry;      /* the RETRY sentinel */
    PyObject *read_value; /* reader's table-file lookup, or None */
    PyObject *limits;     /* dict: value table -> slots, or None */
    PyObject *slow;       /* reader's slow path, or None */
    PyObject *maps;       /* dict: table -> its file's read-only mmap (or None), or None */
    PyObject *strides;    /* dict: value table -> bytes per slot (with maps) */
} Lookups;

/* One acquire load of word i; -1 (with IndexError set) when i is outside the segment. */
static inline int load(const Lookups *s, Py_ssize_t i, uint64_t *out) {
    if (i < 0 || i >= s->nwords) {
        PyErr_SetString(PyExc_IndexError, "overlay word outside the segment (freed bytes)");
        return -1;
    }
    *out = atomic_load_explicit((_Atomic uint64_t *)&s->q[i], memory_order_acquire);
    return 0;
}

/* The newest record id <= w_mark that dropped `table` and is not enacted, or 0 (dropped_at). */
static int dropped_at(const Lookups *s, uint64_t table, uint64_t w_mark, uint64_t *out) {
    uint64_t n, t, r, best = 0;
    if (load(s, W_NDROPS, &n) < 0) return -1;
    if (n > MAX_DROPS) n = MAX_DROPS;
    for (uint64_t i = 0; i < n; i++) {
        if (load(s, DROP_BASE + 2 * (Py_ssize_t)i, &t) < 0) return -1;
        if (t != table) continue;
        if (load(s, DROP_BASE + 2 * (Py_ssize_t)i + 1, &r) < 0) return -1;
        if (best < r && r <= w_mark) best = r;
    }
    *out = best;
    return 0;
}

/* The probe: 1 and the version's data location (loc, 0 = removed) when a version <= w_mark
 * exists; 0 when the overlay has none (the table file, or a pending drop); -1 on error. */
static int probe(const Lookups *s, uint64_t table, uint64_t index, uint64_t w_mark,
                 uint64_t *loc_out) {
    uint64_t h = ((index ^ (table << 47)) * HASH_K) >> s->shift;
    Py_ssize_t w = (Py_ssize_t)h * SLOT_WORDS + HEADER_WORDS;
    uint64_t tag = table + 1, t, idx, n, rid, below;
    for (;;) {
        if (load(s, w + 1, &t) < 0) return -1;
        if (!t) return 0;
        if (t == tag) {
            if (load(s, w, &idx) < 0) return -1;
            if (idx == index) break;
        }
        w += SLOT_WORDS;
        if (w == s->slots_end) w = HEADER_WORDS;
    }
    if (load(s, w + 2, &n) < 0 || load(s, (Py_ssize_t)n, &rid) < 0) return -1;
    below = UINT64_MAX;
    while (rid > w_mark) { /* newer than the watermark: walk to older versions */
        below = rid;
        if (load(s, (Py_ssize_t)n + 2, &n) < 0) return -1;
        if (!n) return 0;
        if (load(s, (Py_ssize_t)n, &rid) < 0) return -1;
        if (rid >= below) {
            PyErr_SetString(s->torn, "record ids do not fall along a chain (freed bytes)");
            return -1;
        }
    }
    if (load(s, (Py_ssize_t)n + 1, loc_out) < 0) return -1;
    /* a pending drop newer than the version hides it */
    uint64_t nd, d;
    if (load(s, W_NDROPS, &nd) < 0) return -1;
    if (nd) {
        if (dropped_at(s, table, w_mark, &d) < 0) return -1;
        if (d > rid) *loc_out = 0;
    }
    return 1;
}

/* The bytes at loc (end << 32 | start) of the mapping, or None for 0. */
static PyObject *data_at(const Lookups *s, uint64_t loc) {
    if (!loc) Py_RETURN_NONE;
    uint64_t start = loc & 0xFFFFFFFFu, end = loc >> 32;
    if (end < start || (Py_ssize_t)end > s->view.len) {
        PyErr_SetString(PyExc_IndexError, "overlay data outside the segment (freed bytes)");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)s->view.buf + start, (Py_ssize_t)(end - start));
}

static int as_u64(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* The twin of TableFiles.read_value's mapped path (mpwal/_tables.py): slot `index` of value
 * table `table` read from the file's read-only mapping, when the reader has mapped the file as
 * far as the slot: the value's bytes, or None for an empty slot. NULL without an error: not
 * mapped that far (or not at all), the caller asks read_value, which maps more or preads.
 * The enactor may be writing the slot meanwhile: the caller's enacting check catches that. */
static PyObject *table_slot(Lookups *s, PyObject *table, uint64_t index) {
    PyObject *m = PyDict_GetItemWithError(s->maps, table), *so, *out = NULL;
    if (!m || m == Py_None) return NULL;
    if (!(so = PyDict_GetItemWithError(s->strides, table))) return NULL;
    Py_ssize_t stride = PyLong_AsSsize_t(so);
    if (stride < 5) {
        PyErr_Clear();
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(m, &b, PyBUF_SIMPLE) < 0) { /* closed meanwhile: read_value knows */
        PyErr_Clear();
        return NULL;
    }
    /* index < the table's limit, and limit * stride <= 2**40: no overflow */
    uint64_t off = index * (uint64_t)stride;
    if (off + (uint64_t)stride <= (uint64_t)b.len) {
        const unsigned char *p = (const unsigned char *)b.buf + off;
        uint64_t stored = p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24;
        if (!stored || stored > (uint64_t)stride - 3)
            out = Py_NewRef(Py_None);
        else
            out = PyBytes_FromStringAndSize((const char *)p + 4, (Py_ssize_t)stored - 1);
    }
    PyBuffer_Release(&b);
    return out;
}

/* Prefetch the home slot of (table, indices[i]), if indices[i] is an int: find_many asks for
 * the slot of the key PREFETCH_AHEAD places ahead, so a batch's cache misses overlap. */
#define PREFETCH_AHEAD 16
static void prefetch_home(const Lookups *s, uint64_t table, PyObject *item) {
    if (!PyLong_CheckExact(item)) return;
    unsigned long long index = PyLong_AsUnsignedLongLong(item);
    if (index == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* the lookup itself raises for it */
        return;
    }
    uint64_t h = (((uint64_t)index ^ (table << 47)) * HASH_K) >> s->shift;
    Py_ssize_t w = (Py_ssize_t)h * SLOT_WORDS + HEADER_WORDS;
    if (w + 1 < s->view.len / 8) __builtin_prefetch(&s->q[w], 0);
}

/* find_many(table, indices, w_mark, read) -> list (see _overlay._make_lookups) */
static PyObject *find_many(Lookups *s, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t table, w_mark, index, loc, d;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "find_many(table, indices, w_mark, read)");
        return NULL;
    }
    if (as_u64(args[0], &table) < 0 || as_u64(args[2], &w_mark) < 0) return NULL;
    PyObject *read = args[3];
    PyObject *seq = PySequence_Fast(args[1], "indices must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(count);
    if (!out) goto fail;
    int dropped_checked = 0;
    uint64_t dropped = 0;
    /* the reader's own table-file read: slots come from its mappings here (table_slot) */
    int ours = 0;
    if (s->maps && read != Py_None && s->read_value != Py_None) {
        ours = PyObject_RichCompareBool(read, s->read_value, Py_EQ);
        if (ours < 0) goto fail;
    }
    for (Py_ssize_t i = 0; i < count && i < PREFETCH_AHEAD; i++) prefetch_home(s, table, items[i]);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item;
        if (i + PREFETCH_AHEAD < count) prefetch_home(s, table, items[i + PREFETCH_AHEAD]);
        if (as_u64(items[i], &index) < 0) goto fail;
        int got = probe(s, table, index, w_mark, &loc);
        if (got < 0) goto fail;
        if (got) {
            item = data_at(s, loc);
        } else {
            if (!dropped_checked) {
                if (dropped_at(s, table, w_mark, &d) < 0) goto fail;
                dropped = d;
                dropped_checked = 1;
            }
            if (dropped) {
                item = Py_NewRef(Py_None);
            } else if (read == Py_None) {
                item = Py_NewRef(s->miss);
            } else {
                item = ours ? table_slot(s, args[0], index) : NULL;
                if (!item && !PyErr_Occurred())
                    item = PyObject_CallFunctionObjArgs(read, args[0], items[i], NULL);
            }
        }
        if (!item) goto fail;
        PyList_SET_ITEM(out, i, item);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *call_slow(Lookups *s, PyObject *table, PyObject *index) {
    if (s->slow == Py_None) return Py_NewRef(s->retry);
    return PyObject_CallFunctionObjArgs(s->slow, table, index, NULL);
}

/* value_now(table, index): a reader's whole value() (see _overlay._make_lookups) */
static PyObject *value_now(Lookups *s, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t table, index, st, st2, w_mark, loc, enacting, d;
    PyObject *data;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "value_now(table, index)");
        return NULL;
    }
    /* the argument check: a value table, an int index inside it; else the slow path, which
     * raises the precise error */
    if (s->limits == Py_None || !PyLong_CheckExact(args[1]) || !PyLong_CheckExact(args[0]))
        return call_slow(s, args[0], args[1]);
    PyObject *limit = PyDict_GetItemWithError(s->limits, args[0]);
    if (!limit) {
        if (PyErr_Occurred()) return NULL;
        return call_slow(s, args[0], args[1]);
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]), lim = PyLong_AsSsize_t(limit);
    if ((i == -1 || lim == -1) && PyErr_Occurred()) {
        PyErr_Clear();
        return call_slow(s, args[0], args[1]);
    }
    if (i < 0 || i >= lim) return call_slow(s, args[0], args[1]);
    index = (uint64_t)i;
    if (as_u64(args[0], &table) < 0) return NULL;

    if (load(s, W_STRUCT, &st) < 0) return NULL;
    if (st & 1) return call_slow(s, args[0], args[1]);
    if (load(s, W_COMMITTED, &w_mark) < 0) return NULL;
    int got = probe(s, table, index, w_mark, &loc);
    if (got < 0) {
        if (PyErr_ExceptionMatches(PyExc_IndexError) || PyErr_ExceptionMatches(s->torn)) {
            PyErr_Clear(); /* freed bytes under a structural change: the slow path */
            return call_slow(s, args[0], args[1]);
        }
        return NULL;
    }
    if (got) {
        data = data_at(s, loc);
        if (!data) {
            if (!PyErr_ExceptionMatches(PyExc_IndexError)) return NULL;
            PyErr_Clear();
            return call_slow(s, args[0], args[1]);
        }
    } else {
        if (dropped_at(s, table, w_mark, &d) < 0) return NULL;
        if (d) {
            data = Py_NewRef(Py_None);
        } else {
            if (s->read_value == Py_None) {
                PyErr_SetString(PyExc_RuntimeError, "value_now needs a reader's read_value");
                return NULL;
            }
            data = s->maps ? table_slot(s, args[0], index) : NULL;
            if (!data && !PyErr_Occurred())
                data = PyObject_CallFunctionObjArgs(s->read_value, args[0], args[1], NULL);
            if (!data) return NULL;
            atomic_thread_fence(memory_order_acquire); /* the file's bytes read before enacting */
            if (load(s, W_ENACTING, &enacting) < 0) { Py_DECREF(data); return NULL; }
            if (enacting > w_mark) { /* the enactor may be writing past W into that file */
                Py_DECREF(data);
                return call_slow(s, args[0], args[1]);
            }
        }
    }
    atomic_thread_fence(memory_order_acquire); /* the data copied before struct is checked */
    if (load(s, W_STRUCT, &st2) < 0) { Py_DECREF(data); return NULL; }
    if (st2 != st) {
        Py_DECREF(data);
        return call_slow(s, args[0], args[1]);
    }
    return data;
}

/* -- the key-value layer's get (mpwal/kv/_column.py's Column.get is the reference) ------- */

static uint64_t kv_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* Chunk `chunk` of index table `table` at watermark w into out[512], as Reader._chunk_at reads
 * it: the overlay's version (removed or dropped: zeros), else zeros past a pending drop, else
 * the table file (its mapping, else read_chunk(table, chunk)), which sets *from_file. 0, or -1
 * with an exception. */
static int kv_chunk(Lookups *s, PyObject *read_chunk, uint64_t table, uint64_t chunk, uint64_t w,
                    unsigned char *out, int *from_file) {
    uint64_t loc, d;
    int got = probe(s, table, chunk, w, &loc);
    if (got < 0) return -1;
    if (got) {
        if (!loc) {
            memset(out, 0, KV_CHUNK_ENTRIES * ENTRY_BYTES);
            return 0;
        }
        uint64_t start = loc & 0xFFFFFFFFu, end = loc >> 32;
        if (end < start || end - start != KV_CHUNK_ENTRIES * ENTRY_BYTES ||
            end > (uint64_t)s->view.len) {
            PyErr_SetString(PyExc_IndexError, "an index chunk's version outside the segment");
            return -1;
        }
        memcpy(out, (const char *)s->view.buf + start, KV_CHUNK_ENTRIES * ENTRY_BYTES);
        return 0;
    }
    if (dropped_at(s, table, w, &d) < 0) return -1;
    if (d) {
        memset(out, 0, KV_CHUNK_ENTRIES * ENTRY_BYTES);
        return 0;
    }
    *from_file = 1;
    PyObject *t = PyLong_FromUnsignedLongLong(table);
    if (!t) return -1;
    PyObject *m = s->maps ? PyDict_GetItemWithError(s->maps, t) : NULL;
    if (m && m != Py_None) {
        Py_buffer b;
        if (PyObject_GetBuffer(m, &b, PyBUF_SIMPLE) == 0) {
            uint64_t off = chunk * (uint64_t)(KV_CHUNK_ENTRIES * ENTRY_BYTES); /* chunk < 2**31 */
            int done = off + KV_CHUNK_ENTRIES * ENTRY_BYTES <= (uint64_t)b.len;
            if (done) memcpy(out, (const char *)b.buf + off, KV_CHUNK_ENTRIES * ENTRY_BYTES);
            PyBuffer_Release(&b);
            if (done) {
                Py_DECREF(t);
                return 0;
            }
        } else {
            PyErr_Clear(); /* closed meanwhile: read_chunk knows */
        }
    } else if (PyErr_Occurred()) {
        Py_DECREF(t);
        return -1;
    }
    PyObject *r = PyObject_CallFunction(read_chunk, "OK", t, (unsigned long long)chunk);
    Py_DECREF(t);
    if (!r) return -1;
    if (!PyBytes_Check(r) || PyBytes_GET_SIZE(r) != KV_CHUNK_ENTRIES * ENTRY_BYTES) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_TypeError, "read_chunk returned no 512-byte chunk");
        return -1;
    }
    memcpy(out, PyBytes_AS_STRING(r), KV_CHUNK_ENTRIES * ENTRY_BYTES);
    Py_DECREF(r);
    return 0;
}

/* Slot `index` of value table `table` at watermark w, as find_many reads it for a reader: a new
 * reference to bytes or None, or NULL with an exception; a table-file read sets *from_file. */
static PyObject *kv_value(Lookups *s, uint64_t table, uint64_t index, uint64_t w, int *from_file) {
    uint64_t loc, d;
    int got = probe(s, table, index, w, &loc);
    if (got < 0) return NULL;
    if (got) return data_at(s, loc);
    if (dropped_at(s, table, w, &d) < 0) return NULL;
    if (d) Py_RETURN_NONE;
    *from_file = 1;
    PyObject *t = PyLong_FromUnsignedLongLong(table), *out = NULL;
    if (!t) return NULL;
    out = s->maps ? table_slot(s, t, index) : NULL;
    if (!out && !PyErr_Occurred())
        out = PyObject_CallFunction(s->read_value, "OK", t, (unsigned long long)index);
    Py_DECREF(t);
    return out;
}

/* The indexes a lookup checks, from a column's header chunk: (table, bits) of the current one
 * (entry 1; 0: INDEX_A at default_bits), then a reindex's old one (entry 2, if any). The count,
 * or 0 if a word is not valid (the Python path names the damage). */
static int kv_indexes(const unsigned char *header, uint64_t header_table, uint64_t default_bits,
                      uint64_t *tables, uint64_t *bits) {
    int n = 0;
    for (int which = 1; which <= 2; which++) {
        uint64_t word = kv_le64(header + which * ENTRY_BYTES), off = word >> 8, b = word & 0xFF;
        if (!word) {
            if (which == 2) break;
            off = KV_INDEX_A;
            b = default_bits;
        }
        if ((off != KV_INDEX_A && off != KV_INDEX_B) || b < KV_MIN_INDEX_BITS || b > KV_MAX_INDEX_BITS)
            return 0;
        tables[n] = header_table + off;
        bits[n++] = b;
    }
    return n;
}

/* One key's value at watermark w through the indexes of kv_indexes: a new reference to bytes,
 * None, or RETRY (multipart, or a slot the Python path would call damaged); NULL on error. */
static PyObject *kv_find(Lookups *s, PyObject *read_chunk, uint64_t header_table,
                         const uint64_t *tables, const uint64_t *bits, int ntables, uint64_t h,
                         PyObject *key_obj, uint64_t w, int *from_file) {
    unsigned char chunk[KV_CHUNK_ENTRIES * ENTRY_BYTES];
    const char *key = PyBytes_AS_STRING(key_obj);
    Py_ssize_t key_len = PyBytes_GET_SIZE(key_obj);
    for (int i = 0; i < ntables; i++) {
        unsigned address_bits = (unsigned)bits[i] + 6 + KV_TIER_BITS;
        uint64_t c = h >> (64 - bits[i]), partial = (h << bits[i]) >> address_bits;
        uint64_t mask = ((uint64_t)1 << address_bits) - 1;
        if (kv_chunk(s, read_chunk, tables[i], c, w, chunk, from_file) < 0) return NULL;
        for (int e = 0; e < KV_CHUNK_ENTRIES; e++) {
            uint64_t v = kv_le64(chunk + e * ENTRY_BYTES);
            if (!v || v >> address_bits != partial) continue;
            uint64_t slot = (v & mask) >> KV_TIER_BITS, tier = v & ((1u << KV_TIER_BITS) - 1);
            if (tier >= KV_MULTIPART) return Py_NewRef(s->retry);
            PyObject *data = kv_value(s, header_table + 3 + tier, slot, w, from_file);
            if (!data) return NULL;
            if (data == Py_None || PyBytes_GET_SIZE(data) == 0 ||
                (unsigned char)PyBytes_AS_STRING(data)[0] != KV_WHOLE) {
                Py_DECREF(data); /* no value here: the next entry */
                continue;
            }
            const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
            Py_ssize_t n = PyBytes_GET_SIZE(data), klen = (Py_ssize_t)p[1] | (Py_ssize_t)p[2] << 8;
            if (n < KV_WHOLE_HEAD || KV_WHOLE_HEAD + klen > n) {
                Py_DECREF(data);
                return Py_NewRef(s->retry); /* torn: the Python path raises */
            }
            if (klen == key_len && memcmp(p + KV_WHOLE_HEAD, key, (size_t)klen) == 0) {
                PyObject *out = PyBytes_FromStringAndSize((const char *)p + KV_WHOLE_HEAD + klen,
                                                          n - KV_WHOLE_HEAD - klen);
                Py_DECREF(data);
                return out;
            }
            Py_DECREF(data);
        }
    }
    Py_RETURN_NONE;
}

/* kv_get(header_table, hashes, keys, default_bits, read_chunk) -> list, or RETRY: a key-value
 * reader's get of each key (bytes, with its hash) at the current watermark, all at that one
 * watermark: the twin of Column.get under Reader.read_with. The column's header (which index,
 * how many bits; a reindex's old index too), the key's chunk in each, the WHOLE slot of each
 * entry whose partial key matches (tier tables follow the header table: base + 3 + tier), the
 * key check. RETRY whenever the Python path must answer: a multipart value or a slot it would
 * call damaged, a structural change or the enactor under the read (the checks of value_now),
 * freed bytes. */
static PyObject *kv_get(Lookups *s, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t header_table, default_bits, st, st2, w, enacting, tables[2], bits[2], h;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "kv_get(header_table, hashes, keys, default_bits, read_chunk)");
        return NULL;
    }
    if (as_u64(args[0], &header_table) < 0 || as_u64(args[3], &default_bits) < 0) return NULL;
    if (!PyList_Check(args[1]) || !PyList_Check(args[2]) ||
        PyList_GET_SIZE(args[1]) != PyList_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_TypeError, "kv_get's hashes and keys are lists of one length");
        return NULL;
    }
    if (s->read_value == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "kv_get needs a reader's read_value");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(args[2]);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_Check(PyList_GET_ITEM(args[2], i))) {
            PyErr_SetString(PyExc_TypeError, "kv_get's keys are bytes");
            return NULL;
        }
    }
    PyObject *read_chunk = args[4], *result = PyList_New(count);
    if (!result) return NULL;
    unsigned char header[KV_CHUNK_ENTRIES * ENTRY_BYTES];
    int from_file = 0;

    if (load(s, W_STRUCT, &st) < 0) goto failed;
    if (st & 1) goto again;
    if (load(s, W_COMMITTED, &w) < 0) goto failed;
    if (kv_chunk(s, read_chunk, header_table, 0, w, header, &from_file) < 0) goto failed;
    int ntables = kv_indexes(header, header_table, default_bits, tables, bits);
    if (!ntables) goto again;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (as_u64(PyList_GET_ITEM(args[1], i), &h) < 0) goto failed;
        PyObject *got = kv_find(s, read_chunk, header_table, tables, bits, ntables, h,
                                PyList_GET_ITEM(args[2], i), w, &from_file);
        if (!got) goto failed;
        PyList_SET_ITEM(result, i, got);
        if (got == s->retry) goto again;
    }
    if (from_file) {
        atomic_thread_fence(memory_order_acquire); /* the files' bytes read before enacting */
        if (load(s, W_ENACTING, &enacting) < 0) goto failed;
        if (enacting > w) goto again; /* the enactor may be writing past W into those files */
    }
    atomic_thread_fence(memory_order_acquire); /* what was copied, before struct is checked */
    if (load(s, W_STRUCT, &st2) < 0) goto failed;
    if (st2 != st) goto again;
    return result;
again:
    Py_DECREF(result);
    return Py_NewRef(s->retry);
failed:
    Py_DECREF(result);
    if (PyErr_ExceptionMatches(PyExc_IndexError) || PyErr_ExceptionMatches(s->torn)) {
        PyErr_Clear(); /* freed bytes under a structural change: the Python path */
        return Py_NewRef(s->retry);
    }
    return NULL;
}

static int Lookups_init(Lookups *s, PyObject *args, PyObject *kwds) {
    PyObject *mapping, *torn, *miss, *retry, *read_value, *limits, *slow, *tables = Py_None;
    unsigned shift;
    Py_ssize_t slots_end;
    (void)kwds;
    if (!PyArg_ParseTuple(args, "OInOOOOOO|O", &mapping, &shift, &slots_end, &torn, &miss,
                          &retry, &read_value, &limits, &slow, &tables))
        return -1;
    if (s->view.obj || s->torn) {
        PyErr_SetString(PyExc_TypeError, "Lookups is initialised once");
        return -1;
    }
    s->torn = Py_NewRef(torn); s->miss = Py_NewRef(miss); s->retry = Py_NewRef(retry);
    s->read_value = Py_NewRef(read_value); s->limits = Py_NewRef(limits);
    s->slow = Py_NewRef(slow);
    if (s->limits != Py_None && !PyDict_Check(s->limits)) {
        PyErr_SetString(PyExc_TypeError, "limits must be a dict or None");
        return -1;
    }
    if (tables != Py_None) {
        if (!PyTuple_Check(tables) || PyTuple_GET_SIZE(tables) != 2 ||
            !PyDict_Check(PyTuple_GET_ITEM(tables, 0)) || !PyDict_Check(PyTuple_GET_ITEM(tables, 1))) {
            PyErr_SetString(PyExc_TypeError, "tables must be (maps, strides) dicts or None");
            return -1;
        }
        s->maps = Py_NewRef(PyTuple_GET_ITEM(tables, 0));
        s->strides = Py_NewRef(PyTuple_GET_ITEM(tables, 1));
    }
    if (PyObject_GetBuffer(mapping, &s->view, PyBUF_SIMPLE) < 0) {
        s->view.obj = NULL;
        return -1;
    }
    if (s->view.len % 8 || (uintptr_t)s->view.buf % 8 || shift < 1 || shift > 63 ||
        slots_end <= HEADER_WORDS || slots_end > s->view.len / 8) {
        PyErr_SetString(PyExc_ValueError, "not an overlay segment's mapping");
        return -1;
    }
    s->q = (const uint64_t *)s->view.buf;
    s->nwords = s->view.len / 8;
    s->shift = shift;
    s->slots_end = slots_end;
    return 0;
}

static int Lookups_traverse(Lookups *s, visitproc visit, void *arg) {
    Py_VISIT(s->torn); Py_VISIT(s->miss); Py_VISIT(s->retry);
    Py_VISIT(s->read_value); Py_VISIT(s->limits); Py_VISIT(s->slow);
    Py_VISIT(s->maps); Py_VISIT(s->strides);
    return 0;
}

static int Lookups_clear(Lookups *s) {
    Py_CLEAR(s->torn); Py_CLEAR(s->miss); Py_CLEAR(s->retry);
    Py_CLEAR(s->read_value); Py_CLEAR(s->limits); Py_CLEAR(s->slow);
    Py_CLEAR(s->maps); Py_CLEAR(s->strides);
    return 0;
}

static void Lookups_dealloc(Lookups *s) {
    PyObject_GC_UnTrack(s);
    Lookups_clear(s);
    if (s->view.obj) PyBuffer_Release(&s->view);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef Lookups_methods[] = {
    {"find_many", (PyCFunction)(void (*)(void))find_many, METH_FASTCALL,
     "find_many(table, indices, w_mark, read): each index's data at w_mark"},
    {"value_now", (PyCFunction)(void (*)(void))value_now, METH_FASTCALL,
     "value_now(table, index): a reader's whole value() at the current watermark"},
    {"kv_get", (PyCFunction)(void (*)(void))kv_get, METH_FASTCALL,
     "kv_get(header_table, hashes, keys, default_bits, read_chunk): a key-value reader's gets, or RETRY"},
    {NULL, NULL, 0, NULL},
};

/* Whether a writable mapping is an overlay segment's shape for (shift, slots_end): aligned,
 * nslots = 2**(64 - shift) slots after the header, inside the mapping. */
static int segment_shape(Py_buffer view, unsigned shift, Py_ssize_t slots_end) {
    if ((uintptr_t)view.buf % 8 || shift < 34 || shift > 63) return 0; /* at most 2**30 slots */
    Py_ssize_t nslots = (Py_ssize_t)1 << (64 - shift);
    return slots_end == HEADER_WORDS + nslots * SLOT_WORDS && slots_end <= view.len / 8;
}

/* link(mapping, record_id, items, more, off, shift, slots_end) -> (keys, added): the
 * writer's loop of _overlay.OverlayWriter._link_versions (the reference): for each (key, data)
 * of the iterables `items` then `more`, write the data, then the version node, then link it
 * (a known key, found by probing the hash: its slot's head, and the old head's `newer`; a new
 * key: the empty slot that ends its probe run, its tag last). Returns the tuple of the keys, in
 * order (the blob's, for freeing), and how many were new to the hash. The data and node stores
 * are relaxed; the head and tag stores are releases, so a reader that sees a link sees what it
 * leads to (the contract in _overlay.py). The caller allocated the blob at `off` (blob_size
 * bytes) and checked the room. */
static int store(uint64_t *q, Py_ssize_t nwords, Py_ssize_t i, uint64_t v, memory_order order) {
    if (i < 0 || i >= nwords) {
        PyErr_SetString(PyExc_IndexError, "overlay word outside the segment");
        return -1;
    }
    atomic_store_explicit((_Atomic uint64_t *)&q[i], v, order);
    return 0;
}

static uint64_t wload(const uint64_t *q, Py_ssize_t i) { /* the writer's own words: relaxed */
    return atomic_load_explicit((_Atomic uint64_t *)&q[i], memory_order_relaxed);
}

/* The slot of (table, index), or the empty slot that ends its probe run (tag 0), as a word
 * offset; -1 with an exception if the hash has no empty slot or the segment is inconsistent. */
static Py_ssize_t slot_probe(const uint64_t *q, Py_ssize_t nwords, uint64_t table, uint64_t index,
                        unsigned shift, Py_ssize_t slots_end) {
    uint64_t h = ((index ^ (table << 47)) * HASH_K) >> shift;
    Py_ssize_t w = (Py_ssize_t)h * SLOT_WORDS + HEADER_WORDS;
    for (Py_ssize_t probes = 0;; probes++) {
        if (w + 2 >= nwords || probes > slots_end) {
            PyErr_SetString(PyExc_IndexError, "no empty overlay slot");
            return -1;
        }
        uint64_t t = wload(q, w + 1);
        if (!t || (t == table + 1 && wload(q, w) == index)) return w;
        w += SLOT_WORDS;
        if (w == slots_end) w = HEADER_WORDS;
    }
}

/* A (table, index) key tuple's two numbers. */
static int key_numbers(PyObject *key, uint64_t *table, uint64_t *index) {
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 2) {
        PyErr_SetString(PyExc_TypeError, "a key is (table, index)");
        return -1;
    }
    if (as_u64(PyTuple_GET_ITEM(key, 0), table) < 0 || as_u64(PyTuple_GET_ITEM(key, 1), index) < 0)
        return -1;
    return 0;
}

typedef struct {
    uint64_t *q;
    Py_ssize_t nwords, len; /* words, bytes of the mapping */
    uint64_t record_id, pos;
    PyObject *keys;
    Py_ssize_t added;
    unsigned shift;
    Py_ssize_t slots_end;
} Linking;

/* One (key, data) pair: its version written at L->pos and linked. */
static int link_one(Linking *L, PyObject *pair) {
    uint64_t *q = L->q;
    Py_ssize_t nwords = L->nwords;
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
        PyErr_SetString(PyExc_TypeError, "items hold ((table, index), data) pairs");
        return -1;
    }
    PyObject *key = PyTuple_GET_ITEM(pair, 0), *d = PyTuple_GET_ITEM(pair, 1);
    if (d != Py_None && !PyBytes_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "a version's data is bytes or None");
        return -1;
    }
    uint64_t table, index;
    if (key_numbers(key, &table, &index) < 0) return -1;
    if (PyList_Append(L->keys, key) < 0) return -1;
    Py_ssize_t nw = (Py_ssize_t)(L->pos >> 3);
    if (store(q, nwords, nw, L->record_id, memory_order_relaxed) < 0 ||
        store(q, nwords, nw + 3, 0, memory_order_relaxed) < 0) /* no newer version yet */
        return -1;
    if (d == Py_None) {
        if (store(q, nwords, nw + 1, 0, memory_order_relaxed) < 0) return -1;
        L->pos += NODE_BYTES;
    } else {
        Py_ssize_t len = PyBytes_GET_SIZE(d);
        uint64_t start = L->pos + NODE_BYTES, end = start + (uint64_t)len;
        if (end > (uint64_t)L->len) {
            PyErr_SetString(PyExc_IndexError, "overlay data outside the segment");
            return -1;
        }
        /* the data before its node; plain bytes: no reader looks at them before the link */
        memcpy((char *)q + start, PyBytes_AS_STRING(d), (size_t)len);
        if (store(q, nwords, nw + 1, (end << 32) | start, memory_order_relaxed) < 0) return -1;
        L->pos = (end + 7) & ~(uint64_t)7;
    }
    Py_ssize_t w = slot_probe(q, nwords, table, index, L->shift, L->slots_end);
    if (w < 0) return -1;
    if (wload(q, w + 1)) { /* a known key: link with one release store of the head */
        uint64_t head = wload(q, w + 2);
        if (store(q, nwords, nw + 2, head, memory_order_relaxed) < 0 ||
            store(q, nwords, (Py_ssize_t)head + 3, (uint64_t)nw, memory_order_relaxed) < 0)
            return -1;
        return store(q, nwords, w + 2, (uint64_t)nw, memory_order_release);
    }
    /* a new key: the empty slot, its tag stored last */
    if (store(q, nwords, nw + 2, 0, memory_order_relaxed) < 0 ||
        store(q, nwords, w, index, memory_order_relaxed) < 0 ||
        store(q, nwords, w + 2, (uint64_t)nw, memory_order_relaxed) < 0)
        return -1;
    L->added++;
    return store(q, nwords, w + 1, table + 1, memory_order_release);
}

/* The home slot of each key of an iterable of (key, data) pairs, prefetched: a record's keys
 * hash to scattered slots, each a cache (and TLB) miss; asked for together, the misses overlap
 * instead of following one another in link_one. Only a hint: whatever is not a well-formed
 * pair is left for link_one to refuse. */
static int prefetch_homes(const Linking *L, PyObject *iterable) {
    /* only what can be iterated twice: a generator's pairs would be gone for link_all */
    if (!PyList_Check(iterable) && !PyTuple_Check(iterable) &&
        !Py_IS_TYPE(iterable, &PyDictItems_Type))
        return 0;
    PyObject *it = PyObject_GetIter(iterable), *pair;
    if (!it) return -1;
    while ((pair = PyIter_Next(it))) {
        uint64_t table, index;
        if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2 &&
            key_numbers(PyTuple_GET_ITEM(pair, 0), &table, &index) == 0) {
            uint64_t h = ((index ^ (table << 47)) * HASH_K) >> L->shift;
            Py_ssize_t w = (Py_ssize_t)h * SLOT_WORDS + HEADER_WORDS;
            if (w + 1 < L->nwords) __builtin_prefetch(&L->q[w], 1);
        }
        PyErr_Clear(); /* a bad key: link_one raises for it */
        Py_DECREF(pair);
    }
    Py_DECREF(it);
    PyErr_Clear();
    return 0;
}

/* Every pair of an iterable (a dict's items, a list) through link_one. */
static int link_all(Linking *L, PyObject *iterable) {
    PyObject *it = PyObject_GetIter(iterable), *pair;
    if (!it) return -1;
    while ((pair = PyIter_Next(it))) {
        int r = link_one(L, pair);
        Py_DECREF(pair);
        if (r < 0) {
            Py_DECREF(it);
            return -1;
        }
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *native_link(PyObject *module, PyObject *args) {
    PyObject *mapping, *items, *more;
    Linking L = {0};
    unsigned long long off;
    Py_buffer view;
    (void)module;
    if (!PyArg_ParseTuple(args, "OKOOKIn", &mapping, &L.record_id, &items, &more, &off,
                          &L.shift, &L.slots_end))
        return NULL;
    if (PyObject_GetBuffer(mapping, &view, PyBUF_WRITABLE) < 0) return NULL;
    L.q = (uint64_t *)view.buf;
    L.len = view.len;
    L.nwords = view.len / 8;
    L.pos = off;
    PyObject *result = NULL, *keys = NULL;
    if (!segment_shape(view, L.shift, L.slots_end) || off % 8 || off < (uint64_t)L.slots_end * 8) {
        PyErr_SetString(PyExc_ValueError, "not an overlay segment's mapping");
        goto done;
    }
    L.keys = PyList_New(0);
    if (!L.keys) goto done;
    if (prefetch_homes(&L, items) < 0 || link_all(&L, items) < 0 || link_all(&L, more) < 0) {
        Py_CLEAR(L.keys);
        goto done;
    }
    keys = PyList_AsTuple(L.keys);
    Py_CLEAR(L.keys);
    if (!keys) goto done;
    /* a tuple of untracked keys needs no tracking (see _native_record.c) */
    int untracked = 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys) && untracked; i++)
        untracked = !PyObject_GC_IsTracked(PyTuple_GET_ITEM(keys, i));
    if (untracked && PyObject_GC_IsTracked(keys)) PyObject_GC_UnTrack(keys);
    result = Py_BuildValue("(Nn)", keys, L.added); /* steals keys */
done:
    PyBuffer_Release(&view);
    return result;
}

/* unlink(mapping, start, keys, shift, slots_end) -> removed: the twin of
 * OverlayWriter._unlink, inside the writer's structural window: the versions of one enacted
 * record's blob (at byte `start`, one per key of `keys`, in order) leave their chains. Each is
 * its key's oldest: the version just newer than it (its node's `newer`) gets older = 0, or, if
 * it was the newest, the key's slot is removed by backward shift (remove_slot). Returns how
 * many keys left the hash. Stores are relaxed: the window (struct odd, then even with a
 * release) is what readers trust, not these words. */
static int remove_slot(uint64_t *q, Py_ssize_t nwords, Py_ssize_t w, unsigned shift,
                       Py_ssize_t slots_end) {
    Py_ssize_t hole = w, j = w;
    for (Py_ssize_t probes = 0;; probes++) {
        j += SLOT_WORDS;
        if (j == slots_end) j = HEADER_WORDS;
        if (j + 2 >= nwords || probes > slots_end) {
            PyErr_SetString(PyExc_IndexError, "a slot outside the segment");
            return -1;
        }
        uint64_t t = wload(q, j + 1);
        if (!t) break;
        uint64_t idx = wload(q, j);
        Py_ssize_t h = (Py_ssize_t)(((idx ^ ((t - 1) << 47)) * HASH_K) >> shift) * SLOT_WORDS +
                       HEADER_WORDS;
        /* an entry stays when its home lies cyclically in (hole, j] */
        if ((hole < j && hole < h && h <= j) || (hole > j && (h > hole || h <= j))) continue;
        atomic_store_explicit((_Atomic uint64_t *)&q[hole], idx, memory_order_relaxed);
        atomic_store_explicit((_Atomic uint64_t *)&q[hole + 2], wload(q, j + 2),
                              memory_order_relaxed);
        atomic_store_explicit((_Atomic uint64_t *)&q[hole + 1], t, memory_order_relaxed);
        hole = j;
    }
    atomic_store_explicit((_Atomic uint64_t *)&q[hole + 1], 0, memory_order_relaxed);
    return 0;
}

static PyObject *native_unlink(PyObject *module, PyObject *args) {
    PyObject *mapping, *keys;
    unsigned long long start;
    unsigned shift;
    Py_ssize_t slots_end, removed = 0;
    Py_buffer view;
    (void)module;
    if (!PyArg_ParseTuple(args, "OKO!In", &mapping, &start, &PyTuple_Type, &keys, &shift,
                          &slots_end))
        return NULL;
    if (PyObject_GetBuffer(mapping, &view, PyBUF_WRITABLE) < 0) return NULL;
    uint64_t *q = (uint64_t *)view.buf;
    Py_ssize_t nwords = view.len / 8;
    PyObject *result = NULL;
    if (!segment_shape(view, shift, slots_end) || start % 8 || start < (uint64_t)slots_end * 8) {
        PyErr_SetString(PyExc_ValueError, "not an overlay segment's mapping");
        goto done;
    }
    Py_ssize_t nw = (Py_ssize_t)(start >> 3);
    /* a first walk of the blob's nodes (in order, so the hardware prefetches them) asks for
     * each word the second walk will touch at random: the newer version's node, or the key's
     * home slot; the misses then overlap (a hint only: the second walk checks everything) */
    for (Py_ssize_t k = 0, p = nw; k < PyTuple_GET_SIZE(keys); k++) {
        if (p < slots_end || p + 3 >= nwords) break;
        uint64_t nn = wload(q, p + 3), table, index;
        if (nn) {
            if (nn + 2 < (uint64_t)nwords) __builtin_prefetch(&q[nn + 2], 1);
        } else if (key_numbers(PyTuple_GET_ITEM(keys, k), &table, &index) == 0) {
            Py_ssize_t w = (Py_ssize_t)(((index ^ (table << 47)) * HASH_K) >> shift) * SLOT_WORDS +
                           HEADER_WORDS;
            if (w + 1 < nwords) __builtin_prefetch(&q[w], 1);
        } else {
            PyErr_Clear(); /* the second walk raises for it */
        }
        uint64_t loc = wload(q, p + 1);
        p = loc ? (Py_ssize_t)((((loc >> 32) + 7)) >> 3) : p + NODE_WORDS;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); k++) {
        if (nw < slots_end || nw + 3 >= nwords) {
            PyErr_SetString(PyExc_IndexError, "a version outside the segment");
            goto done;
        }
        Py_ssize_t nn = (Py_ssize_t)wload(q, nw + 3);
        if (nn) { /* the table file is below the newer version now */
            if (nn < slots_end || nn + 2 >= nwords) {
                PyErr_SetString(PyExc_IndexError, "a version outside the segment");
                goto done;
            }
            atomic_store_explicit((_Atomic uint64_t *)&q[nn + 2], 0, memory_order_relaxed);
        } else {
            PyObject *key = PyTuple_GET_ITEM(keys, k);
            uint64_t table, index;
            if (key_numbers(key, &table, &index) < 0) goto done;
            Py_ssize_t w = slot_probe(q, nwords, table, index, shift, slots_end);
            if (w < 0) goto done;
            if (!wload(q, w + 1)) {
                PyErr_SetObject(PyExc_KeyError, key);
                goto done;
            }
            if (remove_slot(q, nwords, w, shift, slots_end) < 0) goto done;
            removed++;
        }
        /* the next node follows this version's data */
        uint64_t loc = wload(q, nw + 1);
        nw = loc ? (Py_ssize_t)((((loc >> 32) + 7)) >> 3) : nw + NODE_WORDS;
    }
    result = PyLong_FromSsize_t(removed);
done:
    PyBuffer_Release(&view);
    return result;
}

/* store_release(mapping, word, value), store_fenced(mapping, word, value) and
 * load_acquire(mapping, word) -> int: the header words the Python code stores and loads
 * (_overlay._Segment.store_release, .store_fenced and .load_acquire), with the ordering the
 * contract in _overlay.py gives them. A release store: every load and store before it is
 * visible before it (committed, enacted, enacting after a batch, a segment's state). A fenced
 * store: a release store, then a release fence, so that no later store is visible before it
 * either (struct, which opens and closes a structural window: the window's stores, and the
 * reuse of the space it freed, are seen only with the struct value that covers them; enacting
 * before a batch's file writes). An acquire load, after an acquire fence: every load before
 * it (data copied, a table file read) is made before it, and no later load before it (struct
 * and enacting checked after a lookup). */
static int header_word(PyObject *mapping, PyObject *word, int flags, Py_buffer *view,
                       _Atomic uint64_t **at) {
    Py_ssize_t i = PyLong_AsSsize_t(word);
    if (i == -1 && PyErr_Occurred()) return -1;
    if (PyObject_GetBuffer(mapping, view, flags) < 0) return -1;
    if (i < 0 || i >= HEADER_WORDS || i >= view->len / 8) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_IndexError, "not a header word of the segment");
        return -1;
    }
    *at = (_Atomic uint64_t *)view->buf + i;
    return 0;
}

static PyObject *store_ordered(PyObject *const *args, Py_ssize_t nargs, int fenced) {
    Py_buffer view;
    _Atomic uint64_t *at;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "takes (mapping, word, value)");
        return NULL;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(args[2]);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (header_word(args[0], args[1], PyBUF_WRITABLE, &view, &at) < 0) return NULL;
    atomic_store_explicit(at, v, memory_order_release);
    if (fenced) atomic_thread_fence(memory_order_release);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *native_store_release(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    return store_ordered(args, nargs, 0);
}

static PyObject *native_store_fenced(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    return store_ordered(args, nargs, 1);
}

static PyObject *native_load_acquire(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer view;
    _Atomic uint64_t *at;
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "load_acquire(mapping, word)");
        return NULL;
    }
    if (header_word(args[0], args[1], PyBUF_SIMPLE, &view, &at) < 0) return NULL;
    atomic_thread_fence(memory_order_acquire); /* what was read before is read before it */
    uint64_t v = atomic_load_explicit(at, memory_order_acquire);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(v);
}

/* blob_size(datas) -> int: the twin of OverlayWriter.blob_size, ring bytes of a record whose
 * versions hold `datas` (bytes, or None for removed): each its node and its data padded to 8. */
static PyObject *native_blob_size(PyObject *module, PyObject *datas) {
    (void)module;
    PyObject *it = PyObject_GetIter(datas), *d;
    if (!it) return NULL;
    uint64_t size = 0;
    while ((d = PyIter_Next(it))) {
        if (d == Py_None) {
            size += NODE_BYTES;
        } else if (PyBytes_Check(d)) {
            size += (NODE_BYTES + 7 + (uint64_t)PyBytes_GET_SIZE(d)) & ~(uint64_t)7;
        } else {
            PyErr_SetString(PyExc_TypeError, "a version's data is bytes or None");
            Py_DECREF(d);
            Py_DECREF(it);
            return NULL;
        }
        Py_DECREF(d);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(size);
}

static PyMethodDef module_methods[] = {
    {"link", native_link, METH_VARARGS,
     "link(mapping, record_id, items, more, off, shift, slots_end) -> (keys, added)"},
    {"unlink", native_unlink, METH_VARARGS,
     "unlink(mapping, start, keys, shift, slots_end) -> removed: free one enacted blob"},
    {"store_release", (PyCFunction)(void (*)(void))native_store_release, METH_FASTCALL,
     "store_release(mapping, word, value): a header word stored with release ordering"},
    {"store_fenced", (PyCFunction)(void (*)(void))native_store_fenced, METH_FASTCALL,
     "store_fenced(mapping, word, value): a header word stored, then a release fence"},
    {"load_acquire", (PyCFunction)(void (*)(void))native_load_acquire, METH_FASTCALL,
     "load_acquire(mapping, word) -> int: a header word loaded with acquire ordering"},
    {"blob_size", native_blob_size, METH_O, "blob_size(datas) -> int (OverlayWriter.blob_size)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LookupsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mpwal._native.Lookups",
    .tp_basicsize = sizeof(Lookups),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The overlay lookups of one mapped segment (see mpwal/_overlay.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lookups_init,
    .tp_dealloc = (destructor)Lookups_dealloc,
    .tp_traverse = (traverseproc)Lookups_traverse,
    .tp_clear = (inquiry)Lookups_clear,
    .tp_methods = Lookups_methods,
};

static struct PyModuleDef native_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "mpwal._native",
    .m_doc = "mpwal's native hot paths; mpwal/_overlay.py is the reference they must match.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&LookupsType) < 0) return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    Py_INCREF(&LookupsType);
    if (PyModule_AddObject(m, "Lookups", (PyObject *)&LookupsType) < 0) {
        Py_DECREF(&LookupsType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddFunctions(m, mpwal_record_methods) < 0 ||
        PyModule_AddFunctions(m, mpwal_log_methods) < 0 ||
        PyModule_AddFunctions(m, mpwal_tables_methods) < 0 ||
        PyModule_AddFunctions(m, mpwal_kv_methods) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
