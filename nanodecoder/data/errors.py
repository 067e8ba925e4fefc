"""The one exception type of the data pipeline."""
from __future__ import annotations


class DataError(Exception):
    """A problem with the ``data:`` section, its files or the prepared cache.

    The message is one line that names the setting or file and says how to fix it.
    """
