"""Where mpwal runs: Linux; on x86-64 with either backend, elsewhere with the native one.

mpwal needs Linux for open file description locks, ``/dev/shm`` and ``fallocate``. The
pure-Python backend also relies on x86-64's ordering of loads and stores between processes for
the overlay's contract (``_overlay.py``: readers see the writer's stores in the order it made
them); the native backend makes every ordered store and load of that contract a C11 release or
acquire, which is what other processors (aarch64) need. ``check_platform`` runs at ``import
mpwal``; ``check_machine`` when a Writer or Reader opens.
"""

from __future__ import annotations

import platform
import sys

from ._errors import UnsupportedPlatformError

SUPPORTED_MACHINES = ("x86_64", "AMD64")


def check_platform() -> None:
    """Raise ImportError on an operating system mpwal cannot run on (anything but Linux)."""
    if sys.platform != "linux":
        raise ImportError(
            f"mpwal runs only on Linux (it needs OFD locks, /dev/shm and fallocate); this is "
            f"{sys.platform!r}")


def check_machine() -> None:
    """Raise UnsupportedPlatformError on a processor the running backend cannot serve: the
    Python backend serves x86-64 only."""
    from . import _backend  # (imported here: _backend warns at import, after the platform check)
    machine = platform.machine()
    if machine not in SUPPORTED_MACHINES and _backend.native is None:
        raise UnsupportedPlatformError(
            f"mpwal cannot open a database on {machine or 'an unknown machine'} with its Python "
            f"backend ({_backend.why_python}): it relies on x86-64's ordering of shared-memory "
            "stores; install mpwal with a C compiler and the Python headers for the native "
            "backend, which orders them itself")
