#!/usr/bin/env python3
"""``mpwal stress`` without installing the command: ``python scripts/stress.py --help``."""
import sys; from mpwal.tools.stress import main  # noqa: E702
if __name__ == "__main__": sys.exit(main(sys.argv[1:]))  # noqa: E701
