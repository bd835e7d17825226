/* The log decoder (the twin of _format.LogScan): not written yet. */
#include "_native.h"

PyMethodDef mpwal_log_methods[] = {
    {NULL, NULL, 0, NULL},
};
