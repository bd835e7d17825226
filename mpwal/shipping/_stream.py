"""How a database's records sit in a NATS JetStream stream: subjects, headers, the stream.

One stream may hold several databases; each has two subjects, named from its database id:

* ``mpwal.<database id>.records``: one message per durable record, in record-id order. The body
  is the record's bytes as the log holds them (``_format.py``); the headers are
  ``Nats-Msg-Id: <database id>:<epoch>:<record id>`` (JetStream drops a message whose id it saw
  within its duplicate window: a second line of defence only, the window being time-bound),
  ``Mpwal-Record-Id`` and ``Mpwal-Epoch``.
* ``mpwal.<database id>.meta``: the directory's table definitions and layer (``mpwal.meta``'s
  ``tables`` and ``layer``), JSON, published by the shipper when they change; a follower builds
  its replica from the newest one.

This is the only module that imports the NATS client (the ``nats`` extra).
"""

from __future__ import annotations

import json
from typing import Any

from .._errors import DatabaseError
from .._tables import layer_of, load_catalog

nats: Any
try:
    import nats
    from nats.js import JetStreamContext
    from nats.js.errors import NotFoundError
except ImportError:  # the core keeps no network dependency
    nats = None

RECORD_ID = "Mpwal-Record-Id"
EPOCH = "Mpwal-Epoch"
MSG_ID = "Nats-Msg-Id"


def require_nats() -> None:
    if nats is None:
        raise DatabaseError("shipping needs the NATS client: pip install 'mpwal[nats]'")


def records_subject(database_id: str) -> str:
    return f"mpwal.{database_id}.records"


def meta_subject(database_id: str) -> str:
    return f"mpwal.{database_id}.meta"


def meta_of(path: str) -> bytes:
    """The table definitions and layer of a directory, as the meta subject carries them."""
    tables = [t.describe() for _, t in sorted(load_catalog(path).items())]
    return json.dumps({"tables": tables, "layer": layer_of(path)}, sort_keys=True).encode()


async def connect(url: str) -> tuple[Any, JetStreamContext]:
    """A connection that reconnects for ever (the shipper and follower ride out restarts);
    ``url`` may list several servers of a cluster, comma-separated."""
    require_nats()
    nc = await nats.connect(servers=[u.strip() for u in url.split(",") if u.strip()],
                            max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                            connect_timeout=5, allow_reconnect=True)
    return nc, nc.jetstream(timeout=10)


async def ensure_stream(js: JetStreamContext, stream: str, database_id: str,
                        replicas: int = 1) -> None:
    """Create the stream if it is missing, or add this database's subjects to it."""
    subjects = [f"mpwal.{database_id}.>"]
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        await js.add_stream(name=stream, subjects=subjects, num_replicas=replicas)
        return
    have = list(info.config.subjects or [])
    if not any(covers(h, subjects[0]) for h in have):
        info.config.subjects = have + subjects
        await js.update_stream(info.config)


def covers(pattern: str, subject: str) -> bool:
    """Whether the subject pattern ``pattern`` (``*`` a token, ``>`` the rest) takes every
    subject ``subject`` (itself a pattern) takes."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]) or (tok == "*" and s[i] == ">"):
            return False
    return len(p) == len(s)


async def last_message(js: JetStreamContext, stream: str, subject: str) -> Any | None:
    """The newest message of ``subject`` in ``stream``, or None."""
    try:
        return await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None


def record_id_of(msg: Any) -> tuple[int, int]:
    """(record id, epoch) of a records message."""
    h = msg.headers or {}
    return int(h[RECORD_ID]), int(h[EPOCH])
