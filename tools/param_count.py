#!/usr/bin/env python
"""Parameter report for blueprints (``python tools/param_count.py blueprints/*.yaml [--json]``): see
``nanodecoder/cli/param_count.py``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from nanodecoder.cli.param_count import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
