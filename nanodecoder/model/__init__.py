"""Model assembly: spec -> nn.Module."""
from .builder import build_model, clean_name, materialize, unwrap
from .decoder import Decoder, ModelOutput
from .spec import ModelSpec, build_model_spec

__all__ = ["build_model", "clean_name", "materialize", "Decoder", "ModelOutput", "ModelSpec", "build_model_spec", "unwrap"]
