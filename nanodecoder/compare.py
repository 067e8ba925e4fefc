"""``python -m nanodecoder.compare A.yaml B.yaml ...``: see ``nanodecoder/cli/compare.py``."""
import sys

from .cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
