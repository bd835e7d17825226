"""Where mpwal runs: Linux, on x86-64.

mpwal needs Linux for open file description locks, ``/dev/shm`` and ``fallocate``; the
pure-Python backend also relies on x86-64's ordering of stores between processes for its
shared-memory sequence lock (readers see a window's writes in the order the writer made them).
``check_platform`` runs at ``import mpwal``; ``check_machine`` when a Writer or Reader opens.
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
    """Raise UnsupportedPlatformError on a processor the pure-Python backend cannot serve."""
    machine = platform.machine()
    if machine not in SUPPORTED_MACHINES:
        raise UnsupportedPlatformError(
            f"mpwal cannot open a database on {machine or 'an unknown machine'}: the pure-Python "
            "backend relies on x86-64 store ordering for shared memory; other architectures "
            "need the native backend, not yet built")
