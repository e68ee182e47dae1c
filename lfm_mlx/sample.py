"""Sampling settings: the checkpoint's defaults, and the sampler/processors built from them.

The sampling maths is mlx-lm's (``mlx_lm.sample_utils``); this module decides the settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_repetition_penalty, make_sampler

# Liquid AI's recommended settings for LFM2.5 instruct models, used where generation_config.json
# carries none (the published LFM2.5-350M file has only token ids).
LIQUID_DEFAULTS = dict(temperature=0.1, top_k=50, top_p=1.0, min_p=0.0, repetition_penalty=1.05)


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = LIQUID_DEFAULTS["temperature"]
    top_k: int = LIQUID_DEFAULTS["top_k"]
    top_p: float = LIQUID_DEFAULTS["top_p"]
    min_p: float = LIQUID_DEFAULTS["min_p"]
    repetition_penalty: float = LIQUID_DEFAULTS["repetition_penalty"]
    repetition_context_size: int = 64

    def updated(self, **overrides) -> "SamplingSettings":
        """These settings with every override that is not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


def read_generation_config(model_path: Path) -> SamplingSettings:
    """Sampling defaults from the checkpoint's ``generation_config.json`` when it has them."""
    path = Path(model_path) / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        config = {}
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    found = {k: config[k] for k in keys if isinstance(config.get(k), (int, float))}
    if config.get("do_sample") is False:
        found["temperature"] = 0.0
    return SamplingSettings().updated(**found)


def build_sampler(s: SamplingSettings) -> Callable[[mx.array], mx.array]:
    """Temperature 0 is greedy; otherwise top-k, top-p and min-p filter before sampling."""
    top_p = s.top_p if 0 < s.top_p < 1 else 0.0
    return make_sampler(temp=s.temperature, top_p=top_p, min_p=s.min_p, top_k=s.top_k)


def build_processors(s: SamplingSettings, extra: Optional[list] = None) -> list:
    """Repetition penalty first, then the caller's processors (a grammar mask must have the last word)."""
    processors = []
    if s.repetition_penalty and s.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(s.repetition_penalty, s.repetition_context_size))
    return processors + list(extra or [])
