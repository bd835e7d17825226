/*
 * What the source files of mpwal._native share. One extension module, a file per concern:
 *
 *   _native.c         the module, and the overlay: readers' lookups, the writer's publish loop
 *   _native_record.c  the writer's intake: gathering a record's values, encoding it with its CRC
 *   _native_log.c     the log decoder: a record of a log file back into Op tuples
 *   _native_tables.c  the applier's slot packing: values into runs of table-file slots
 *
 * Each function is the twin of a Python function that is the reference (named in its comment);
 * tests/test_native*.py compare the two byte for byte.
 */
#ifndef MPWAL_NATIVE_H
#define MPWAL_NATIVE_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

extern PyMethodDef mpwal_record_methods[]; /* _native_record.c */
extern PyMethodDef mpwal_log_methods[];    /* _native_log.c */
extern PyMethodDef mpwal_tables_methods[]; /* _native_tables.c */

#endif
