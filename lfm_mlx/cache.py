"""Per-layer decoding state for the LFM2 hybrid, snapshots of it, and prefix reuse across prompts.

Conv layers keep a constant state (the last ``conv_L_cache - 1`` conv inputs), whatever the length.
Attention layers keep K/V in a ``KVCache`` bounded by ``max_size``: once full it keeps the first ``keep``
tokens (attention sinks) and the most recent ones, StreamingLLM-style, so RoPE positions never leave
the trained window. Layers never own a cache; the model receives the list from ``make_cache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx

DEFAULT_MAX_KV_SIZE = 32_768  # LFM2.5's trained context


class ConvCache:
    """The last ``K - 1`` inputs of a depthwise causal conv of width ``K``."""

    def __init__(self, left_padding: Optional[mx.array] = None) -> None:
        self.state: Optional[mx.array] = None  # [B, K - 1, C]
        self.offset = 0  # tokens seen, padding included
        self.left_padding = left_padding
        # Speculative decoding keeps the last call's whole input window [B, K - 1 + L, C]: the state
        # after any of its L positions is a slice of it, so rejected drafts cost no recomputation.
        self.keep_window = False
        self.window: Optional[mx.array] = None

    def rewind(self, fed: int, kept: int) -> None:
        """Forget the last ``fed - kept`` of the ``fed`` tokens of the last call (needs ``keep_window``)."""
        if kept < fed:
            width = self.state.shape[1]
            self.state = self.window[:, kept : kept + width]
            self.offset -= fed - kept

    @property
    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes


class KVCache:
    """Keys/values of one attention layer.

    Storage grows in steps up to ``max_size``. When new tokens would overflow it, a chunk right after
    the sinks is dropped, the rest slides left and its keys are re-rotated by the same delta, so the
    cached positions stay ``0 … size - 1``. Dropping a chunk (not one token) at a time keeps that
    re-rotation rare enough that decode speed does not depend on the window being full.
    With ``bits`` set, K/V are stored affine-quantized (``mx.quantize``) and read back by quantized
    matmuls. ``left_padding`` ([B]) marks leading pad tokens of a left-padded batch.
    """

    step = 256

    def __init__(
        self,
        max_size: Optional[int] = DEFAULT_MAX_KV_SIZE,
        keep: int = 4,
        bits: Optional[int] = None,
        group_size: int = 64,
        rope=None,
        left_padding: Optional[mx.array] = None,
    ) -> None:
        if max_size is not None and max_size <= keep:
            raise ValueError(f"max_kv_size ({max_size}) must be larger than keep ({keep})")
        if bits not in (None, 4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, not {bits}")
        self.max_size, self.keep = max_size, keep
        self.bits, self.group_size = bits, group_size
        self.rope = rope
        self.left_padding = left_padding
        self.keys: Optional[tuple] = None  # tuples: (array,) or (packed, scales, biases), [B, H, cap, …]
        self.values: Optional[tuple] = None
        self.offset = 0  # tokens held = RoPE position of the next token
        self.evictions = 0  # bumped when rolling rewrites history: older snapshots become stale

    def _pack(self, x: mx.array) -> tuple:
        return (x,) if self.bits is None else tuple(mx.quantize(x, self.group_size, self.bits))

    def _unpack(self, t: tuple) -> mx.array:
        return t[0] if self.bits is None else mx.dequantize(*t, group_size=self.group_size, bits=self.bits)

    def _reserve(self, k: tuple, v: tuple, needed: int) -> None:
        if self.keys is not None and needed <= self.keys[0].shape[2]:
            return
        capacity = -(-needed // self.step) * self.step
        if self.max_size is not None:
            capacity = min(capacity, self.max_size)

        def grow(old: Optional[tuple], like: tuple) -> tuple:
            new = tuple(mx.zeros((*a.shape[:2], capacity, a.shape[3]), a.dtype) for a in like)
            if old is not None and self.offset:
                for n, o in zip(new, old):
                    n[..., : self.offset, :] = o[..., : self.offset, :]
            return new

        self.keys, self.values = grow(self.keys, k), grow(self.values, v)

    def prepare(self, n: int) -> int:
        """Make room for ``n`` new tokens; return the RoPE position of the first."""
        if self.max_size is not None and self.offset + n > self.max_size:
            self._evict(self.offset + n - self.max_size)
        return self.offset

    def _evict(self, needed: int) -> None:
        window = self.max_size - self.keep
        if needed > self.offset - self.keep:
            raise ValueError(
                f"{needed} new tokens do not fit a KV window of {self.max_size} (keep={self.keep}): "
                f"feed at most {window} tokens at a time"
            )
        chunk = min(max(needed, min(1024, max(1, self.max_size // 16))), self.offset - self.keep)
        src, dst = slice(self.keep + chunk, self.offset), slice(self.keep, self.offset - chunk)
        tail = self._unpack(tuple(b[..., src, :] for b in self.keys))
        B, H, T, D = tail.shape
        # Every kept key moves back by `chunk` positions: one rotation by -chunk for all of them.
        tail = self.rope(tail.reshape(B * H * T, 1, D), offset=-chunk).reshape(B, H, T, D)
        for buf, new in zip(self.keys, self._pack(tail)):
            buf[..., dst, :] = new
        for buf in self.values:
            buf[..., dst, :] = buf[..., src, :]
        self.offset -= chunk
        self.evictions += 1

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        n = keys.shape[2]
        k, v = self._pack(keys), self._pack(values)
        self._reserve(k, v, self.offset + n)
        for buf, new in zip(self.keys + self.values, k + v):
            buf[..., self.offset : self.offset + n, :] = new
        self.offset += n
        ks = tuple(b[..., : self.offset, :] for b in self.keys)
        vs = tuple(b[..., : self.offset, :] for b in self.values)
        return (ks[0], vs[0]) if self.bits is None else (ks, vs)

    def rewind(self, fed: int, kept: int) -> None:
        """Forget the last ``fed - kept`` tokens written (their slots are simply overwritten later)."""
        self.offset -= fed - kept

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in self.keys + self.values)


def make_cache(
    model,
    max_kv_size: Optional[int] = None,
    keep: int = 4,
    kv_bits: Optional[int] = None,
    left_padding: Optional[Sequence[int]] = None,
) -> list:
    """One cache per layer. ``max_kv_size=None`` means the trained context (32,768 tokens); 0 means
    unbounded. ``left_padding`` gives each row's count of leading pad tokens in a left-padded batch."""
    if max_kv_size is None:
        max_kv_size = min(DEFAULT_MAX_KV_SIZE, model.args.max_position_embeddings)
    pad = None if left_padding is None else mx.array(left_padding)
    head_dim = model.args.head_dim
    group_size = next((g for g in (64, 32) if head_dim % g == 0), None)
    if kv_bits is not None and group_size is None:
        raise ValueError(f"kv_bits needs a head_dim divisible by 32; this model's is {head_dim}")
    return [
        KVCache(max_kv_size or None, keep, kv_bits, group_size or 64, rope=layer.self_attn.rope, left_padding=pad)
        if layer.is_attention
        else ConvCache(pad)
        for layer in model.layers
    ]


@dataclass(frozen=True)
class Snapshot:
    """The hybrid state at one token position: conv states are tiny and kept whole; KV is a length."""

    conv_states: tuple
    offsets: tuple
    evictions: tuple


def snapshot(cache: list) -> Snapshot:
    # Conv states are replaced, never mutated, by the model, so holding references is enough.
    return Snapshot(
        conv_states=tuple(getattr(c, "state", None) for c in cache),
        offsets=tuple(c.offset for c in cache),
        evictions=tuple(getattr(c, "evictions", 0) for c in cache),
    )


def restore(cache: list, snap: Snapshot) -> bool:
    """Roll the cache back to ``snap``; False (and nothing changed) if the KV window rolled since."""
    if any(getattr(c, "evictions", 0) != e for c, e in zip(cache, snap.evictions)):
        return False
    for c, state, offset in zip(cache, snap.conv_states, snap.offsets):
        if isinstance(c, ConvCache):
            c.state = state
        c.offset = offset
    return True


class PromptCache:
    """One conversation's hybrid state, the tokens it holds, and snapshots at chosen positions.

    A conv state cannot be trimmed, only restored, so prefix reuse needs a snapshot at (or before)
    the point where a new prompt departs from the old one: the engine takes them at message
    boundaries and just before the last prompt token.
    """

    max_snapshots = 8

    def __init__(self, model, max_kv_size: Optional[int] = None, keep: int = 4,
                 kv_bits: Optional[int] = None) -> None:
        self.model = model
        self.settings = dict(max_kv_size=max_kv_size, keep=keep, kv_bits=kv_bits)
        self.reset()

    def reset(self) -> None:
        self.layers = make_cache(self.model, **self.settings)
        self.tokens: list[int] = []
        self.snapshots: dict[int, Snapshot] = {}

    @property
    def max_kv_size(self) -> Optional[int]:
        return next((c.max_size for c in self.layers if isinstance(c, KVCache)), None)

    def take_snapshot(self) -> None:
        self.snapshots[len(self.tokens)] = snapshot(self.layers)
        while len(self.snapshots) > self.max_snapshots:
            del self.snapshots[min(self.snapshots)]

    def reuse(self, prompt: Sequence[int]) -> int:
        """Bring the state to the longest reusable prefix of ``prompt``; return its length.

        At least one prompt token is always left to feed, since its logits start generation.
        """
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        limit = min(common, len(prompt) - 1)
        if limit == len(self.tokens):
            return limit
        for position in sorted((p for p in self.snapshots if p <= limit), reverse=True):
            if restore(self.layers, self.snapshots[position]):
                self.tokens = self.tokens[:position]
                self.snapshots = {p: s for p, s in self.snapshots.items() if p <= position}
                return position
        self.reset()
        return 0
