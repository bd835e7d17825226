"""The tools built on the engine: the ``mpwal`` command line (``cli``), inspection (``inspect``:
inspect, verify, dump, cleanup), the main job (``stress``) and the benchmarks (``bench``). The
engine never imports them."""
