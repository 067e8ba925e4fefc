"""Hugging Face interop: import a local model directory as a run folder, export a run as one.

    python -m nanodecoder.hf import HF_MODEL_DIR --out RUN_DIR [--dtype float32|bfloat16|float16]
    python -m nanodecoder.hf export RUN_DIR --out HF_DIR [--checkpoint best|latest|step_N]

Families: llama, mistral, qwen2, qwen3, gpt2, mixtral, qwen3_moe, olmoe (``families.py``: one
mapping table each).  ``transformers`` is never imported here; the ``hf`` tokenizer kind needs the
``tokenizers`` package (``pip install 'nanodecoder[hf]'``).
"""
from .convert import export_hf, hf_family_for, import_hf
from .families import FAMILIES
from .rules import HFError
from ..data.hf_tokenizer import HFTokenizer

__all__ = ["FAMILIES", "HFError", "HFTokenizer", "export_hf", "hf_family_for", "import_hf"]
