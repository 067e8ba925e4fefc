"""Nanodecoder: decoder-only transformers (dense and MoE) built from YAML blueprints."""
__version__ = "0.1.0"
