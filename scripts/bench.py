"""The benchmarks: mpwal beside SQLite (WAL mode) and LMDB. Same as `mpwal bench`; see
mpwal/tools/bench.py and `python scripts/bench.py --help`."""

import sys

from mpwal.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
