"""The optional native backend (mpwal/_native*.c). Everything else is in pyproject.toml.

``optional=True``: a machine without a C compiler or the Python headers still installs mpwal,
which then runs its Python backend (``mpwal.backend == "python"``) and says why, once.
"""

from setuptools import Extension, setup

# one extension module, a source file per concern (the sanitizer test builds mpwal/_native*.c)
SOURCES = ["mpwal/_native.c", "mpwal/_native_record.c", "mpwal/_native_log.c",
           "mpwal/_native_tables.c", "mpwal/_native_kv.c"]

setup(ext_modules=[Extension(
    "mpwal._native", SOURCES, libraries=["z"], optional=True,
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)])
