#!/usr/bin/env python
"""FineWeb(-Edu) or any Hugging Face text dataset -> GPT-2 token shards in llm.c's .bin format
(``python tools/prepare_fineweb.py [--dataset fineweb] [--out DIR] ...``): see ``nanodecoder/cli/prepare_fineweb.py``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from nanodecoder.cli.prepare_fineweb import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
