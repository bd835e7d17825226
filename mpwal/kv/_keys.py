"""What the key-value API accepts: keys, values and column names, each checked once with an
error that says what to pass instead."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._errors import ArgumentTypeError, DatabaseError, ValueTooLargeError
from . import _layout as L


def _as_bytes(what: str, data: object) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        raise ArgumentTypeError(f"a {what} must be bytes, not str: encode it first "
                                f"({what}.encode())")
    raise ArgumentTypeError(f"a {what} must be bytes, bytearray or memoryview, not "
                            f"{type(data).__name__}")


class MappingReads:
    """``[]`` and ``in`` over a class's ``get`` (KVWriter's, KVReader's, KVSnapshot's)."""

    def get(self, key: bytes, default: bytes | None = None, *, column: str = "default"
            ) -> bytes | None:
        raise NotImplementedError

    def __getitem__(self, key: bytes) -> bytes:
        got = self.get(key)
        if got is None:
            raise KeyError(key)
        return got

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]


def check_key(key: object) -> bytes:
    k = _as_bytes("key", key)
    if len(k) > L.MAX_KEY:
        raise ValueTooLargeError(f"a key is at most {L.MAX_KEY} bytes, this one is {len(k)}")
    return k


def check_value(value: object) -> bytes:
    v = _as_bytes("value", value)
    if len(v) > L.MAX_VALUE:
        raise ValueTooLargeError(f"a value is at most {L.MAX_VALUE} bytes, this one is {len(v)}")
    return v


def check_column_names(columns: Iterable[str]) -> list[str]:
    if isinstance(columns, (str, bytes)):
        raise ArgumentTypeError("columns must be a list of names, such as ('default', 'users'), "
                                "not one string")
    try:
        names = list(columns)
    except TypeError:
        raise ArgumentTypeError(f"columns must be a list of names, not {type(columns).__name__}") from None
    if not names:
        raise ArgumentTypeError("columns must name at least one column")
    for n in names:
        if not isinstance(n, str) or not n:
            raise ArgumentTypeError(f"a column name is a non-empty str, not {n!r}")
    if len(set(names)) != len(names):
        raise ArgumentTypeError(f"column names must differ: {names}")
    if len(names) > L.MAX_COLUMNS:
        raise ArgumentTypeError(f"at most {L.MAX_COLUMNS} columns, not {len(names)}")
    return names


def columns_of(layer: dict[str, Any]) -> list[str]:
    """The column names a key-value directory's layer object lists."""
    if layer.get("kind") != L.KIND:
        raise DatabaseError(f"not a key-value directory (layer {layer.get('kind')!r})")
    if layer.get("version") != L.VERSION:
        raise DatabaseError(f"key-value layout {layer.get('version')!r} is not this mpwal's "
                            f"{L.VERSION}: upgrade mpwal to open it")
    cols = layer.get("columns")
    if not isinstance(cols, list) or not cols or not all(isinstance(c, str) for c in cols):
        raise DatabaseError("the key-value layer's column list is damaged")
    return cols
