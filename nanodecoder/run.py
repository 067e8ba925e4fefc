"""``python -m nanodecoder.run BLUEPRINT ...``: see ``nanodecoder/cli/run.py``."""
import sys

from .cli.run import main

if __name__ == "__main__":
    sys.exit(main())
