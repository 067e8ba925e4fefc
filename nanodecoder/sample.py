"""``python -m nanodecoder.sample RUN_DIR ...``: see ``nanodecoder/cli/sample.py``."""
import sys

from .cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
