"""Model configuration parsed from a Hugging Face LFM2 / LFM2.5 ``config.json``.

Real checkpoints spell the same thing several ways (``block_ff_dim`` vs ``intermediate_size``,
``full_attn_idxs`` vs ``layer_types``, ``rope_theta`` vs ``rope_parameters``, ``tie_embedding`` vs
``tie_word_embeddings``). They are resolved here, once, the way ``transformers.Lfm2Config`` resolves them,
so the model code reads a single spelling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("lfm2",)


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
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
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

        layer_types = c.get("layer_types")
        if layer_types is None:
            # transformers: no layer_types and no full_attn_idxs means every layer is attention.
            attn = c.get("full_attn_idxs")
            attn = set(range(num_layers) if attn is None else attn)
            layer_types = ["full_attention" if i in attn else "conv" for i in range(num_layers)]

        rope_parameters = c.get("rope_parameters") or {}
        rope_theta = rope_parameters.get("rope_theta", c.get("rope_theta", cls.rope_theta))
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        rope_scaling = c.get("rope_scaling")
        if rope_type != "default":
            rope_scaling = rope_parameters

        # transformers pops these legacy spellings over the new ones.
        intermediate_size = c.get("block_ff_dim", c.get("intermediate_size", cls.intermediate_size))
        tie = c.get("tie_embedding", c.get("tie_word_embeddings", cls.tie_word_embeddings))

        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in c.items() if k in known}
        kwargs.update(
            layer_types=list(layer_types),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            intermediate_size=int(intermediate_size),
            tie_word_embeddings=bool(tie),
        )
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None


def load_config(model_path: Path) -> dict:
    """Read ``config.json`` from a model directory with errors that say what to fix."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json in {model_path}: pass a Hugging Face model directory "
            "(config.json + *.safetensors) or a hub id such as LiquidAI/LFM2.5-350M"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
