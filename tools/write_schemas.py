"""Write (or --check) the JSON Schemas in schemas/ from the declarations in the code."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanodecoder.cli.schemas import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
