"""Per-layer decoding state for the LFM2 hybrid.

Conv layers keep a constant state (the last ``conv_L_cache - 1`` conv inputs), whatever the length.
Attention layers keep K/V: ``KVCache`` grows with the conversation, ``RollingKVCache`` is bounded by
``max_kv_size`` and keeps the first ``keep`` tokens (attention sinks) plus the most recent ones.

Every cache answers ``prepare(n)`` before ``n`` new tokens are written: it makes room and returns the
RoPE position of the first of them. Layers never own a cache; the model receives the list.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


class ConvCache:
    """The last ``K - 1`` inputs of a depthwise causal conv of width ``K``."""

    def __init__(self) -> None:
        self.state: Optional[mx.array] = None  # [B, K - 1, C]
        self.offset = 0

    @property
    def state_arrays(self) -> list:
        return [] if self.state is None else [self.state]


class KVCache:
    """Keys/values of one attention layer, grown in steps so decode does not reallocate each token."""

    step = 256

    def __init__(self) -> None:
        self.keys: Optional[mx.array] = None  # [B, H_kv, capacity, D]
        self.values: Optional[mx.array] = None
        self.offset = 0

    def prepare(self, n: int) -> int:
        return self.offset

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        if self.keys is not None and needed <= self.keys.shape[2]:
            return
        B, H, _, D = keys.shape
        capacity = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, capacity, D), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[-1]), values.dtype)
        if self.keys is not None and self.offset:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        self._grow(keys, values, self.offset + n)
        self.keys[..., self.offset : self.offset + n, :] = keys
        self.values[..., self.offset : self.offset + n, :] = values
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state_arrays(self) -> list:
        return [] if self.keys is None else [self.keys, self.values]


def make_cache(model, max_kv_size: Optional[int] = None) -> list:
    """One cache per layer: ``ConvCache`` for conv layers, a KV cache for attention layers."""
    return [KVCache() if layer.is_attention else ConvCache() for layer in model.layers]
