"""lfm-mlx: Liquid AI's LFM2 / LFM2.5 on Apple's MLX."""

import warnings

from .cache import PromptCache, make_cache
from .chat import ChatSession
from .config import ConfigError, ModelArgs
from .constrain import BudgetError, SchemaError, SchemaReport, check_schema, schema_report
from .engine import Cancelled, Engine, Request
from .extract import Extraction, extract, extract_many
from .generate import GenerationResponse, batch_generate, generate, stream_generate
from .loading import CheckpointError, load, load_model
from .model import Model
from .sample import SamplingSettings, read_generation_config
from .tools import parse_tool_calls

__all__ = [
    "BudgetError", "Cancelled", "ChatSession", "CheckpointError", "ConfigError", "Engine", "Extraction", "GenerationResponse",
    "Model", "ModelArgs", "PromptCache", "Request", "SamplingSettings", "SchemaError", "SchemaReport", "batch_generate", "check_schema", "extract",
    "extract_many", "generate", "load", "load_model", "make_cache", "parse_tool_calls", "read_generation_config",
    "schema_report", "stream_generate",
]

# `python -m lfm_mlx.extract` runs a module this package has already imported (for `extract`): harmless.
warnings.filterwarnings("ignore", r"'lfm_mlx\.extract' found in sys\.modules", RuntimeWarning)
