"""Which backend runs the hot paths: ``"native"`` (``mpwal._native``, C) or ``"python"``.

The Python code is the reference; the native backend must give the same bytes and answers
(DESIGN invariant 9). ``MPWAL_BACKEND=python`` forces the reference; ``MPWAL_NATIVE_PATH``
loads the extension from a file instead (the tests' AddressSanitizer build). When the extension was
not built (no C compiler or Python headers at install time) or does not import, mpwal runs
the Python backend and says why, once, as a warning; ``mpwal inspect`` shows it too.

What the native backend covers (each C function beside the Python function it is the twin of):

* readers: the overlay lookups (``_overlay._make_lookups``: ``value()``, ``values()``, index
  chunks and entries, snapshot reads: every lookup at a watermark), and ``value()``'s read of
  a slot from a table file the reader has mapped (``TableFiles.read_value``'s mapped path);
* the writer: gathering ``insert_values``'s pairs and encoding a record with its CRC
  (``_record.ChangeSet``, ``_format.encode_record``), a record's overlay size and its publish
  loop (``OverlayWriter.blob_size``, ``_link_versions``), freeing enacted versions
  (``OverlayWriter._unlink``), and the contract's ordered header words (``_overlay``'s
  ``store_release``, ``store_fenced``, ``load_acquire``: C11 atomics);
* the log decoder that enactment, replay, readers' log reads and ``mpwal inspect`` share
  (``_format.LogScan``: records and their ops decoded, CRCs checked, the reason a scan stops);
* the enactor's applier: values packed into runs of table-file slots (``_applier.slot_runs``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

native: ModuleType | None = None


def _load_from(path: str) -> ModuleType:
    """The extension module built at ``path`` (``MPWAL_NATIVE_PATH``), as ``mpwal._native``."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("mpwal._native", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no extension module at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["mpwal._native"] = module
    return module


why_python: str | None = None  # why the Python backend runs, when it does

if os.environ.get("MPWAL_BACKEND", "").lower() == "python":
    why_python = "MPWAL_BACKEND=python"
else:
    try:
        if os.environ.get("MPWAL_NATIVE_PATH"):  # a build of _native.c elsewhere (the tests'
            native = _load_from(os.environ["MPWAL_NATIVE_PATH"])  # sanitizer builds)
        else:
            from . import _native as native  # type: ignore[attr-defined, no-redef]
    except ImportError as e:
        why_python = f"the native extension is not available ({e})"
        warnings.warn(f"mpwal runs its Python backend: {why_python}; reinstall with a C compiler "
                      "and the Python headers for the native one", RuntimeWarning, stacklevel=2)

BACKEND: str = "python" if native is None else "native"


@contextlib.contextmanager
def python_backend() -> Iterator[None]:
    """Run the Python backend for a while, in this process and in those it starts meanwhile
    (``MPWAL_BACKEND=python`` in the environment): segments mapped inside keep it. For the
    benchmarks' side-by-side rows."""
    global native
    saved, env = native, os.environ.get("MPWAL_BACKEND")
    native = None
    os.environ["MPWAL_BACKEND"] = "python"
    try:
        yield
    finally:
        native = saved
        if env is None:
            os.environ.pop("MPWAL_BACKEND", None)
        else:
            os.environ["MPWAL_BACKEND"] = env
