"""The one exception type of the data pipeline, and the one way its text files are read."""
from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A problem with the ``data:`` section, its files or the prepared cache.

    The message is one line that names the setting or file and says how to fix it.
    """


def read_utf8(path: str | Path, missing: str = "no such file") -> str:
    """The text of ``path``; a missing, unreadable or non-UTF-8 file is a DataError naming it (``missing``:
    what to say when it does not exist, e.g. where such a file comes from)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {missing}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
