"""Sampling settings: the checkpoint's defaults, checks on every value a caller sends, and sampling.

The filters are mlx-lm's maths (``mlx_lm.sample_utils``: top-p, then min-p, then top-k on the
log-probabilities, then temperature), rewritten without ``mx.compile`` and without MLX's global random
state: each sequence draws from its own key. So a seed reproduces a reply whatever else is batched
beside it, and no failure inside one request's sampling can leave state behind that breaks the next.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from . import cpu_kernel

# Liquid AI's recommended settings for LFM2.5 instruct models, used where generation_config.json
# carries none (the published LFM2.5-350M file has only token ids).
LIQUID_DEFAULTS = dict(temperature=0.1, top_k=50, top_p=1.0, min_p=0.0, repetition_penalty=1.05)
MAX_TEMPERATURE = 5.0
MAX_PENALTY = 10.0


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each token. Every instance is valid: bad values raise ``ValueError`` naming them."""

    temperature: float = LIQUID_DEFAULTS["temperature"]
    top_k: int = LIQUID_DEFAULTS["top_k"]  # 0: off
    top_p: float = LIQUID_DEFAULTS["top_p"]  # 1: off
    min_p: float = LIQUID_DEFAULTS["min_p"]  # 0: off
    repetition_penalty: float = LIQUID_DEFAULTS["repetition_penalty"]  # 1: off
    repetition_context_size: int = 64
    presence_penalty: float = 0.0  # OpenAI's additive penalties, over the generated tokens
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_integer("top_k", self.top_k, 0, 1 << 24)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, MAX_PENALTY, low_open=True)
        _check_integer("repetition_context_size", self.repetition_context_size, 1, 1 << 20)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        # Integral floats (a JSON 50.0) are the integers they spell.
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "repetition_context_size", int(self.repetition_context_size))

    def updated(self, **overrides) -> "SamplingSettings":
        """These settings with every override that is not None."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def check_vocabulary(self, vocab_size: int) -> None:
        """top_k counts tokens: more than the vocabulary holds is a mistake worth naming."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k must be at most {vocab_size} (the vocabulary size), not {self.top_k}; "
                             "0 turns it off")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


def _check_number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {interval}, not {value!r}")


def _check_integer(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")


def read_generation_config(model_path: Path) -> SamplingSettings:
    """Sampling defaults from the checkpoint's ``generation_config.json`` when it has valid ones."""
    path = Path(model_path) / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    settings = SamplingSettings()
    for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        try:
            settings = settings.updated(**{key: config.get(key)})
        except ValueError:
            pass  # a value we cannot use keeps the default
    if config.get("do_sample") is False:
        settings = settings.updated(temperature=0.0)
    return settings


def build_processors(s: SamplingSettings, extra: Optional[list] = None) -> list:
    """The additive penalties, then the caller's processors (a grammar mask must have the last word).
    The repetition penalty comes before them all, for every row of a step at once: ``repeat_penalty``."""
    processors = make_logits_processors(
        presence_penalty=s.presence_penalty or None, presence_context_size=s.repetition_context_size,
        frequency_penalty=s.frequency_penalty or None, frequency_context_size=s.repetition_context_size,
    )
    return processors + list(extra or [])


def repeat_penalty(logits: mx.array, recent: list[Sequence[int]], penalties: list[float]) -> mx.array:
    """mlx-lm's repetition penalty (``make_repetition_penalty``) for many rows in one gather and one
    scatter: row i's logits at the tokens ``recent[i]`` are divided by ``penalties[i]`` (multiplied
    where negative). Rows are padded with their own last token: a repeated index writes the same value."""
    width = max(map(len, recent))
    if width == 0:
        return logits
    index = mx.array([list(r) + [r[-1]] * (width - len(r)) if r else [0] * width for r in recent], mx.int32)
    penalty = mx.array([p if r else 1.0 for r, p in zip(recent, penalties)], logits.dtype)[:, None]
    selected = mx.take_along_axis(logits, index, axis=-1)
    selected = mx.where(selected < 0, selected * penalty, selected / penalty)
    return mx.put_along_axis(logits, index, selected, axis=-1)


def filter_logprobs(logprobs: mx.array, s: SamplingSettings) -> mx.array:
    """top-p, min-p, then top-k, as mlx-lm applies them: what falls outside becomes -inf."""
    if s.top_p < 1.0:
        ordered = mx.sort(logprobs, axis=-1)
        probs = mx.exp(ordered.astype(mx.float32))
        mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
        total = mass_above[..., :1] + probs[..., :1]
        dropped = (mass_above >= s.top_p * total).sum(axis=-1, keepdims=True)
        threshold = mx.take_along_axis(ordered, dropped, axis=-1)
        logprobs = mx.where(logprobs < threshold, -mx.inf, logprobs)
    if s.min_p > 0.0:
        floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(s.min_p)
        logprobs = mx.where(logprobs < floor, -mx.inf, logprobs)
    if 0 < s.top_k < logprobs.shape[-1]:
        dropped = mx.argpartition(-logprobs, kth=s.top_k - 1, axis=-1)[..., s.top_k :]
        logprobs = mx.put_along_axis(logprobs, dropped, mx.array(-mx.inf, logprobs.dtype), axis=-1)
    return logprobs


def sample(logits: mx.array, s: SamplingSettings, keys: Optional[mx.array] = None) -> mx.array:
    """One token per row of ``logits`` [R, V]; row i draws with ``keys[i]`` (keys [R, 2], needed unless greedy).
    Gumbel-max is what ``mx.random.categorical`` does, with each row's noise from its own key.
    Only top-p needs normalised probabilities (min-p is relative to the best token); with top-k and
    no top-p, only the k best can be drawn, so the noise is drawn for them alone: the same
    distribution without a 65k-wide exp and noise per token (a third of a 16-row CPU step)."""
    if s.greedy:
        return mx.argmax(logits, axis=-1)
    if s.top_p >= 1.0 and 0 < s.top_k < logits.shape[-1]:
        best = _best(logits, s.top_k)
        kept = filter_logprobs(mx.take_along_axis(logits, best, axis=-1), s.updated(top_k=0))
        return mx.take_along_axis(best, _gumbel_max(kept, s, keys)[:, None], axis=-1)[:, 0]
    if s.top_p < 1.0:
        logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return _gumbel_max(filter_logprobs(logits, s), s, keys)


def _best(logits: mx.array, k: int) -> mx.array:
    """The indices of each row's k largest logits: the CPU extension's where it runs (MLX's CPU
    argpartition costs ~0.5 ms a row over a 65k vocabulary)."""
    ext = cpu_kernel.extension()
    if ext is not None and mx.default_device() == mx.cpu and logits.dtype == mx.float32:
        return ext.top_k(logits, k, stream=mx.cpu)
    return mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]


def _gumbel_max(logprobs: mx.array, s: SamplingSettings, keys: mx.array) -> mx.array:
    width = logprobs.shape[-1]
    # Every row's noise in one op (vmap over the keys), each the same as from its key alone.
    noise = mx.vmap(lambda key: mx.random.gumbel((width,), key=key))(keys)
    return mx.argmax(logprobs * (1.0 / s.temperature) + noise, axis=-1)


def new_key(seed: Optional[int]) -> mx.array:
    """A sequence's random key ([2]): from its seed, or from the OS when none is given."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    return mx.random.key(seed % (1 << 64))


def split_keys(keys: mx.array) -> tuple[mx.array, mx.array]:
    """(the keys to keep, keys to draw with now) for one key per row ([R, 2]), in one op: row i's are
    what ``mx.random.split(keys[i])`` gives, whatever rows are beside it."""
    both = mx.vmap(mx.random.split)(keys)
    return both[:, 0], both[:, 1]
