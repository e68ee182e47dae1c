"""lfm-mlx: Liquid AI's LFM2 / LFM2.5 on Apple's MLX."""

from .cache import PromptCache, make_cache
from .chat import ChatSession
from .config import ConfigError, ModelArgs
from .generate import GenerationResponse, batch_generate, generate, stream_generate
from .loading import CheckpointError, load, load_model
from .model import Model
from .tools import parse_tool_calls

__all__ = [
    "ChatSession", "CheckpointError", "ConfigError", "GenerationResponse", "Model", "ModelArgs", "PromptCache",
    "batch_generate", "generate", "load", "load_model", "make_cache", "parse_tool_calls", "stream_generate",
]
