"""Shared fixtures: a fresh database directory per test, and a check that no shared-memory
segment outlives the test that made it (names derive from the directory, so they are unique per
test and safe under ``pytest -n auto``)."""

from __future__ import annotations

import os

import pytest

from mpwal._overlay import stale_segments


@pytest.fixture
def db(tmp_path):
    """Path of a database directory that does not exist yet; fails the test if a segment of it
    is left in /dev/shm afterwards."""
    path = str(tmp_path / "db")
    yield path
    real = os.path.realpath(path)
    left = stale_segments(real)
    for name in left:
        from mpwal._overlay import unlink_segment
        unlink_segment(name)
    assert not left, f"shared-memory segments left behind: {left}"
