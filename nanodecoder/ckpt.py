"""``python -m nanodecoder.ckpt consolidate RUN_DIR ...``: see ``nanodecoder/cli/ckpt.py``."""
import sys

from .cli.ckpt import main

if __name__ == "__main__":
    sys.exit(main())
