"""Producers: processes other than the writer that commit records through it (DESIGN
"Producers"). The protocol is ``mpwal/_wire.py``; the writer's side is ``mpwal/_intake.py``.

``Producer`` (a raw directory's records), ``KVProducer`` (a key-value directory's puts and
deletes); both are built on ``_client.Client``, the connection to the writer.
"""

from ._kv import KVProducer, KVProducerBatch
from ._producer import Producer

__all__ = ["Producer", "KVProducer", "KVProducerBatch"]
