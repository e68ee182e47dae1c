"""Model configuration parsed from a Hugging Face LFM2 / LFM2.5 ``config.json``.

Real checkpoints spell the same thing several ways (``block_ff_dim`` vs ``intermediate_size``,
``full_attn_idxs`` vs ``layer_types``, ``rope_theta`` vs ``rope_parameters``, ``tie_embedding`` vs
``tie_word_embeddings``). They are resolved here, once, the way ``transformers.Lfm2Config`` resolves them,
so the model code reads a single spelling.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("lfm2",)
LAYER_TYPES = ("conv", "full_attention")
# Far above any LFM2 (vocabulary 65,536, width 2,048, 16 layers, 32 heads), and low enough that every
# weight dimension (the conv block's 3 x hidden_size, heads x head_dim) fits MLX's 32-bit shapes.
MAX_WIDTH = 2**24
MAX_COUNT = 1024
INTEGER_LIMITS = {
    "vocab_size": MAX_WIDTH, "hidden_size": MAX_WIDTH, "intermediate_size": MAX_WIDTH,
    "block_multiple_of": MAX_WIDTH, "head_dim": MAX_WIDTH // MAX_COUNT, "num_hidden_layers": MAX_COUNT,
    "num_attention_heads": MAX_COUNT, "num_key_value_heads": MAX_COUNT, "conv_L_cache": MAX_COUNT,
    "max_position_embeddings": 2**31 - 1,
}


class ConfigError(ValueError):
    """A config.json that cannot describe an LFM2 model; the message names the key."""


@dataclass
class ModelArgs:
    model_type: str = "lfm2"
    vocab_size: int = 65536
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    max_position_embeddings: int = 128_000
    norm_eps: float = 1e-5
    conv_bias: bool = False
    conv_L_cache: int = 3
    intermediate_size: int = 12288
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: Optional[float] = 1.0
    block_auto_adjust_ff_dim: bool = True
    layer_types: list[str] = field(default_factory=list)
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = True
    eos_token_id: Any = None
    bos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    quantization: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check_values()
        self.rope_theta = float(self.rope_theta)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) in config.json: fix one of them, or set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        if not 1 <= self.ff_dim <= MAX_WIDTH:
            raise ConfigError(
                f"intermediate_size (block_ff_dim) with block_ffn_dim_multiplier and block_multiple_of gives a "
                f"feed-forward width of {self.ff_dim} in config.json: use values that give 1 to {MAX_WIDTH:,}"
            )

    def _check_values(self) -> None:
        """Each value's type and range, so nonsense fails here naming its key instead of deep in MLX."""
        for key, high in INTEGER_LIMITS.items():
            if key != "head_dim" or self.head_dim is not None:  # null head_dim: hidden_size / heads
                _check_integer(key, getattr(self, key), high)
        for key in ("norm_eps", "rope_theta", "block_ffn_dim_multiplier"):
            value = getattr(self, key)
            nullable = key == "block_ffn_dim_multiplier"
            if not (value is None and nullable or _is_number(value) and 0 < value < math.inf):
                raise ConfigError(
                    f"{key} is {value!r} in config.json: use a positive number{' or null' if nullable else ''}"
                )
        for key in ("conv_bias", "block_auto_adjust_ff_dim", "tie_word_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} is {getattr(self, key)!r} in config.json: use true or false")
        if not isinstance(self.layer_types, list):
            raise ConfigError(
                f"layer_types is {self.layer_types!r} in config.json: use a list with one of "
                f"{' / '.join(map(repr, LAYER_TYPES))} per layer"
            )
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(
                    f"layer_types[{i}] is {t!r} in config.json: use {' or '.join(map(repr, LAYER_TYPES))}"
                )
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(self, key)
            ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not all(_is_integer(i) and i >= 0 for i in ids):
                lists = ", a list of them" if key == "eos_token_id" else ""
                raise ConfigError(f"{key} is {value!r} in config.json: use a token id (an integer >= 0){lists} or null")
        for key in ("rope_scaling", "quantization"):
            _check_settings(key, getattr(self, key))

    @property
    def ff_dim(self) -> int:
        """The SwiGLU width, following transformers' Lfm2MLP rule exactly."""
        dim = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            dim = int(2 * dim / 3)
            if self.block_ffn_dim_multiplier is not None:
                dim = int(self.block_ffn_dim_multiplier * dim)
                m = self.block_multiple_of
                dim = m * ((dim + m - 1) // m)
        return dim

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t != "conv"]

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {model_type!r} in config.json: lfm_mlx runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints (LFM2 / LFM2.5)"
            )
        c = dict(config)
        num_layers = c.get("num_hidden_layers", cls.num_hidden_layers)
        _check_integer("num_hidden_layers", num_layers, MAX_COUNT)  # before a list that long is built

        layer_types = c.get("layer_types")
        if layer_types is None:
            # transformers: no layer_types and no full_attn_idxs means every layer is attention.
            attn = c.get("full_attn_idxs")
            if attn is not None and not (
                isinstance(attn, list) and all(_is_integer(i) and 0 <= i < num_layers for i in attn)
            ):
                raise ConfigError(
                    f"full_attn_idxs is {attn!r} in config.json: use a list of layer indices, 0 to {num_layers - 1}"
                )
            attn = set(range(num_layers) if attn is None else attn)
            layer_types = ["full_attention" if i in attn else "conv" for i in range(num_layers)]

        for key in ("rope_parameters", "quantization_config"):
            _check_settings(key, c.get(key))
        rope_parameters = c.get("rope_parameters") or {}
        rope_theta = rope_parameters.get("rope_theta", c.get("rope_theta", cls.rope_theta))
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        rope_scaling = c.get("rope_scaling")
        if rope_type != "default":
            rope_scaling = rope_parameters

        # transformers pops these legacy spellings over the new ones; they are checked under their own names.
        if "block_ff_dim" in c:
            _check_integer("block_ff_dim", c["block_ff_dim"], MAX_WIDTH)
        if "tie_embedding" in c and not isinstance(c["tie_embedding"], bool):
            raise ConfigError(f"tie_embedding is {c['tie_embedding']!r} in config.json: use true or false")
        intermediate_size = c.get("block_ff_dim", c.get("intermediate_size", cls.intermediate_size))
        tie = c.get("tie_embedding", c.get("tie_word_embeddings", cls.tie_word_embeddings))

        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in c.items() if k in known}
        kwargs.update(
            layer_types=layer_types,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            intermediate_size=intermediate_size,
            tie_word_embeddings=tie,
        )
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_integer(key: str, value: Any, high: int) -> None:
    if not (_is_integer(value) and 1 <= value <= high):
        raise ConfigError(f"{key} is {value!r} in config.json: use an integer from 1 to {high:,}")


def _check_settings(key: str, value: Any) -> None:
    """A nested object such as ``quantization``: an object or null, its ``bits`` and ``group_size`` integers."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{key} is {value!r} in config.json: use an object ({{...}}) or null")
    for name, high in (("bits", 8), ("group_size", MAX_COUNT)):
        if name in value:
            _check_integer(f"{key}.{name}", value[name], high)


def load_config(model_path: Path) -> dict:
    """Read ``config.json`` from a model directory and check it describes an LFM2 model, with errors that
    name the key and what to fix: the converter and the loader fail alike, before any weight is read."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json in {model_path}: pass a Hugging Face model directory "
            "(config.json + *.safetensors) or a hub id such as LiquidAI/LFM2.5-350M"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(config), "a number")
        raise ConfigError(
            f"{path} holds {kind}, not an object: config.json must be one JSON object of settings, "
            '{"model_type": "lfm2", ...}; download or convert the checkpoint again'
        )
    ModelArgs.from_dict(config)
    return config
