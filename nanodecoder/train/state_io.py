"""Nested training state <-> (JSON document, flat tensor dict), without pickle.

Optimizer, sampler and RNG states are nested dicts / lists / tuples holding
numbers, strings, torch tensors and numpy arrays.  :func:`flatten` moves every
tensor and array into a flat ``{key: tensor}`` dict (saved as safetensors) and
leaves a JSON-able document with references; :func:`unflatten` reverses it
exactly (tuples stay tuples, int dict keys stay ints, arrays keep their dtype).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

TENSOR, ARRAY, TUPLE, ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"


def flatten(obj: Any, tensors: dict[str, torch.Tensor] | None = None,
            path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    tensors = {} if tensors is None else tensors

    def walk(o: Any, p: str) -> Any:
        if isinstance(o, torch.Tensor):
            tensors[p] = o.detach().cpu().contiguous()
            return {TENSOR: p}
        if isinstance(o, np.ndarray):
            tensors[p] = torch.from_numpy(np.ascontiguousarray(o))
            return {ARRAY: p}
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (bool, int, float, str)) or o is None:
            return o
        if isinstance(o, tuple):
            return {TUPLE: [walk(v, f"{p}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{p}.{i}") for i, v in enumerate(o)]
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o) and not ({TENSOR, ARRAY, TUPLE, ITEMS} & set(o)):
                return {k: walk(v, f"{p}.{k}") for k, v in o.items()}
            return {ITEMS: [[walk(k, f"{p}.k{i}"), walk(v, f"{p}.{i}")] for i, (k, v) in enumerate(o.items())]}
        raise TypeError(f"cannot store a {type(o).__name__} at '{p.lstrip('.')}' in a checkpoint")

    return walk(obj, path), tensors


def unflatten(doc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(doc, list):
        return [unflatten(v, tensors) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if TENSOR in doc:
        return tensors[doc[TENSOR]]
    if ARRAY in doc:
        return tensors[doc[ARRAY]].numpy()
    if TUPLE in doc:
        return tuple(unflatten(v, tensors) for v in doc[TUPLE])
    if ITEMS in doc:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in doc[ITEMS]}
    return {k: unflatten(v, tensors) for k, v in doc.items()}
