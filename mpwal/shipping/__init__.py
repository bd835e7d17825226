"""Shipping: the change feed to NATS JetStream (``mpwal ship``) and replicas that follow a
stream (``mpwal follow``). ``_stream.py`` says how records sit in a stream; it is the only
module that imports the NATS client (the ``nats`` extra)."""
