"""``python -m nanodecoder.eval RUN_DIR ...``: see ``nanodecoder/cli/eval.py``."""
import sys

from ..cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
