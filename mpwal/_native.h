/*
 * What the source files of mpwal._native share. One extension module, a file per concern:
 *
 *   _native.c         the module, and the overlay: readers' lookups, the writer's publish loop
 *   _native_record.c  the writer's intake: gathering a record's values, encoding it with its CRC
 *   _native_log.c     the log decoder: a record of a log file back into Op tuples
 *   _native_tables.c  the applier's slot packing: values into runs of table-file slots
 *   _native_kv.c      the key-value layer's lookups: an index chunk's matching entries, a slot's key check
 *
 * Each function is the twin of a Python function that is the reference (named in its comment);
 * tests/test_native*.py compare the two byte for byte.
 */
#ifndef MPWAL_NATIVE_H
#define MPWAL_NATIVE_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* the log format's type bytes (_format.py's docstring is the spec) */
#define BEGIN_RECORD 1
#define INSERT_INDEX 2
#define INSERT_VALUE 3
#define END_RECORD 4
#define DROP_TABLE 5
#define REMOVED 0xFFFFFFFFu /* INSERT_VALUE length of a removal */
#define BEGIN_SIZE 9  /* type, record id u64 */
#define DROP_SIZE 3   /* type, table u16 */
#define INDEX_SIZE 19 /* type, table u16, chunk u64, mask u64; then the entries */
#define VALUE_SIZE 15 /* type, table u16, index u64, length u32; then the data */
#define END_SIZE 5    /* type, crc32 u32 */
#define ENTRY_BYTES 8

/* the key-value layer's layout (mpwal/kv/_layout.py is the spec) */
#define KV_CHUNK_ENTRIES 64
#define KV_TIER_BITS 5
#define KV_MIN_INDEX_BITS 4
#define KV_MAX_INDEX_BITS 30
#define KV_MULTIPART 25 /* the first tier that is not a whole value's */
#define KV_WHOLE 1      /* a slot's kind byte: key_len u16, key, value */
#define KV_WHOLE_HEAD 3
#define KV_INDEX_A 1    /* table offsets in a column: header 0, the two indexes 1 and 2 */
#define KV_INDEX_B 2

extern PyMethodDef mpwal_record_methods[]; /* _native_record.c */
extern PyMethodDef mpwal_log_methods[];    /* _native_log.c */
extern PyMethodDef mpwal_tables_methods[]; /* _native_tables.c */
extern PyMethodDef mpwal_kv_methods[];     /* _native_kv.c */

#endif
