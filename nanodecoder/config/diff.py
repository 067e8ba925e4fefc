"""Where two nested mappings differ (resolved blueprints, written-out specs): the one walker behind the resume
notes, the refused architecture changes and the Hugging Face export's family check."""
from __future__ import annotations

from typing import Any, NamedTuple

ABSENT = object()        # ``missing=ABSENT``: a key present on one side only is a difference of its own


class Difference(NamedTuple):
    path: tuple          # keys and list indices from the root (``dotted`` writes it out)
    old: Any             # ABSENT (or ``missing``) where the key is not on that side
    new: Any


def differences(old, new, *, missing: Any = ABSENT, lists: bool = False, path: tuple = ()) -> list[Difference]:
    """Every leaf where ``old`` and ``new`` differ, mappings walked key by key (sorted); ``missing`` stands for
    an absent key (``None``: an absent key equals a null one); ``lists``: lists of equal length are walked
    item by item too (else compared whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(key, missing), new.get(key, missing), missing=missing, lists=lists,
                                     path=(*path, key))]
    if lists and isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new))
                for d in differences(a, b, missing=missing, lists=lists, path=(*path, i))]
    return [] if old == new else [Difference(path, old, new)]
