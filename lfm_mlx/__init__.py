"""lfm-mlx: Liquid AI's LFM2 / LFM2.5 on Apple's MLX."""

from .cache import make_cache
from .config import ConfigError, ModelArgs
from .loading import CheckpointError, load, load_model
from .model import Model

__all__ = ["CheckpointError", "ConfigError", "Model", "ModelArgs", "load", "load_model", "make_cache"]
