"""What the tests of the native backend share: whether it is here, and the leak check.

CI builds the native backend: there a missing one fails the tests marked ``needs_native``,
unless the run forces the Python backend (the suite's second run, ``MPWAL_BACKEND=python``).
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from collections.abc import Callable

import pytest

from mpwal import _backend

native = _backend.native
FORCED_PYTHON = os.environ.get("MPWAL_BACKEND", "").lower() == "python"
needs_native = pytest.mark.skipif(native is None and (not os.environ.get("CI") or FORCED_PYTHON),
                                  reason=f"no native backend here ({_backend.why_python})")


def assert_no_leaks(run: Callable[[int], None], watched: tuple, rounds: int = 3000) -> None:
    """``run(n)`` (n rounds of native calls) warmed up, then run ``rounds`` times more: the
    reference counts of ``watched`` do not move and traced memory grows by under 64 KiB.
    ``watched`` holds the test's own objects, not None/True/False, which any thread touches."""
    run(100)
    gc.collect()
    before = [sys.getrefcount(o) for o in watched]
    tracemalloc.start()
    snap1 = tracemalloc.take_snapshot()
    run(rounds)
    gc.collect()
    snap2 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert [sys.getrefcount(o) for o in watched] == before
    grown = sum(s.size_diff for s in snap2.compare_to(snap1, "filename"))
    assert grown < 64 << 10, f"{grown} bytes more after {rounds} rounds"
