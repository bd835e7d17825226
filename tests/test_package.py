"""The package as users meet it: its public names, version, type marker, logging and platform
checks."""

from __future__ import annotations

import importlib.resources
import inspect
import os
import platform
import subprocess
import sys

import pytest

import mpwal
from mpwal import _backend
import mpwal._platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLIC_API = {
    "Writer", "Reader", "Snapshot", "Record", "IndexTable", "ValueTable",
    "SnapshotExpiredError", "Error", "ArgumentTypeError", "ArgumentRangeError", "ValueTooLargeError", "TableError",
    "ClosedError", "ForkedError", "WriterLockedError", "DatabaseError", "CorruptionError",
    "StorageError", "WriterFailedError", "BackpressureError", "UnsupportedPlatformError",
    "KVWriter", "KVReader", "KVSnapshot", "KVBatch", "IndexFullError",
    "Producer", "KVProducer", "KVProducerBatch", "NoWriterError",
    "Change", "Cursor", "CursorLostError",
}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a new interpreter with no logging configured, importing this checkout's mpwal."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)


# -- public names, version, type marker ---------------------------------------------------------

def test_all_names_exactly_the_public_api():
    assert len(mpwal.__all__) == len(set(mpwal.__all__)), "a name is listed twice"
    assert set(mpwal.__all__) == PUBLIC_API


@pytest.mark.parametrize("name", sorted(PUBLIC_API))
def test_public_name_importable_and_documented(name):
    obj = getattr(mpwal, name)  # what ``from mpwal import name`` looks up
    assert obj.__doc__ and obj.__doc__.strip(), f"mpwal.{name} has no docstring"
    if issubclass(obj, BaseException):
        assert issubclass(obj, mpwal.Error)
        return
    for attr, member in vars(obj).items():  # public methods and properties: documented, typed
        if attr.startswith("_"):
            continue
        fn = member.fget if isinstance(member, property) else member
        if not callable(fn):
            continue  # a class constant such as IndexTable.kind
        assert fn.__doc__, f"mpwal.{name}.{attr} has no docstring"
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        missing = [p for p in params + ["return"] if p not in fn.__annotations__]
        assert not missing, f"mpwal.{name}.{attr} lacks annotations for {missing}"


def test_version_matches_pyproject():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is in the standard library from Python 3.11")
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert mpwal.__version__ == project["version"]


def test_every_subpackage_is_installed():
    """``pip install .`` (not editable) installs only the packages pyproject.toml lists: a
    subpackage missing there breaks ``import mpwal`` on a fresh machine."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is in the standard library from Python 3.11")
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(ROOT, "mpwal")) if "__init__.py" in files}
    assert found == listed


def test_py_typed_marker_ships():
    assert importlib.resources.files("mpwal").joinpath("py.typed").is_file()


# -- logging --------------------------------------------------------------------------------------

def test_logger_has_a_null_handler():
    import logging

    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("mpwal").handlers)


def test_library_warning_writes_nothing_to_stderr():
    """With no logging configured, a warning on "mpwal" (or a child logger) reaches no stream;
    another library's warning still does (Python's last-resort handler), which shows the check
    would see output."""
    got = run_python("import logging, mpwal\n"
                     "logging.getLogger('mpwal').warning('mpwal warning')\n"
                     "logging.getLogger('mpwal._writer').error('mpwal error')\n")
    assert got.returncode == 0, got.stderr
    assert got.stderr == "" and got.stdout == ""
    control = run_python("import logging, mpwal\nlogging.getLogger('other').warning('other warning')\n")
    assert control.returncode == 0 and "other warning" in control.stderr


# -- platform checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["darwin", "win32", "freebsd14", "cygwin"])
def test_check_platform_refuses_other_systems(monkeypatch, name):
    monkeypatch.setattr(sys, "platform", name)
    with pytest.raises(ImportError, match="mpwal runs only on Linux") as info:
        mpwal._platform.check_platform()
    assert repr(name) in str(info.value)


def test_check_platform_accepts_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    mpwal._platform.check_platform()


def test_import_fails_clearly_off_linux():
    got = run_python("import sys; sys.platform = 'darwin'; import mpwal")
    assert got.returncode != 0
    assert "ImportError: mpwal runs only on Linux" in got.stderr
    assert "'darwin'" in got.stderr


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64", "i686", ""])
def test_python_backend_refuses_other_machines(monkeypatch, tmp_path, machine):
    """The Python backend relies on x86-64's ordering: elsewhere a Writer or Reader refuses to
    open, before anything is created, and says how to get the native backend."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(_backend, "native", None)
    path = tmp_path / "db"
    with pytest.raises(mpwal.UnsupportedPlatformError, match="x86-64's ordering") as info:
        mpwal.Writer(path)
    assert "C compiler" in str(info.value) and "native" in str(info.value)
    assert not path.exists(), "the check comes before anything is created"
    path.mkdir()
    with pytest.raises(mpwal.UnsupportedPlatformError, match="x86-64's ordering"):
        mpwal.Reader(path)
    assert isinstance(info.value, mpwal.Error)


@pytest.mark.skipif(_backend.native is None, reason="the native backend is not loaded")
@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
def test_native_backend_serves_other_machines(monkeypatch, machine):
    """The native backend orders its shared-memory stores and loads itself (C11 atomics)."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    mpwal._platform.check_machine()


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_check_machine_accepts_x86_64(monkeypatch, machine):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    mpwal._platform.check_machine()


def test_writer_and_reader_open_on_this_machine(db):
    if platform.machine() not in mpwal._platform.SUPPORTED_MACHINES:
        pytest.skip(f"this machine is {platform.machine()}")
    with mpwal.Writer(db, [mpwal.ValueTable(1, slot_size=8)], enactor="none") as w:
        with w.record() as rec:
            rec.insert_value(1, 0, b"x")
        with mpwal.Reader(db) as r:
            assert r.value(1, 0) == b"x"
