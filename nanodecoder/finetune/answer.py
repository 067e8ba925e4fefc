"""``python -m nanodecoder.finetune.answer RUN_DIR "instruction"``: see ``nanodecoder/cli/answer.py``."""
import sys

from ..cli.answer import main

if __name__ == "__main__":
    sys.exit(main())
