"""The optional native backend (mpwal/_native.c). Everything else is in pyproject.toml.

``optional=True``: a machine without a C compiler or the Python headers still installs mpwal,
which then runs its Python backend (``mpwal.backend == "python"``) and says why, once.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "mpwal._native", ["mpwal/_native.c"], optional=True,
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)])
