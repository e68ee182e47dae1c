"""Attention for decoding rows on MLX's CPU backend: one graph node for all of a step's sequences.

Each sequence decoding one token attends to its own cache. MLX's CPU attention is several nodes per
sequence and layer (RoPE, the cache writes, the attention itself), ~0.5 ms each: with 16 sequences
decoding, attention took longer than all the step's matrix products. Here the rows' RoPE is one call
(a position per row), and the attention of every row is one node of lfm_mlx's CPU extension
(``decode_attention``); the caches are written as before. Prompt chunks, quantized KV caches, other
RoPE variants and other devices keep the model's own path. ``accelerate`` (``lfm_mlx.quantized``)
gives the model's attention layers this class at load time.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernel
from .cache import Rows
from .model import Attention


class CPUAttention(Attention):
    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        if q.shape[0] == 1 and q.shape[2] == 1 and self._decodes(q, [cache]):
            return self._decode(q.transpose(2, 1, 0, 3), k.transpose(2, 1, 0, 3), v.transpose(2, 1, 0, 3),
                                [cache]).transpose(2, 1, 0, 3)
        return super()._attend(q, k, v, mask, cache)

    def _attend_rows(self, q: mx.array, k: mx.array, v: mx.array, rows: Rows) -> mx.array:
        # The engine puts decoding rows (one token each) first, then prompt chunks.
        n = next((i for i, length in enumerate(rows.lengths) if length != 1), len(rows.lengths))
        if n == 0 or not self._decodes(q, rows.caches[:n]):
            return super()._attend_rows(q, k, v, rows)
        part = [x[:, :, :n].transpose(2, 1, 0, 3) for x in (q, k, v)]  # [n, heads, 1, D]
        out = self._decode(*part, rows.caches[:n]).transpose(2, 1, 0, 3)
        if n == len(rows.lengths):
            return out
        rest = Rows(rows.caches[n:], rows.lengths[n:])
        return mx.concatenate([out, super()._attend_rows(q[:, :, n:], k[:, :, n:], v[:, :, n:], rest)], axis=2)

    def _decodes(self, q: mx.array, caches: Sequence) -> bool:
        """Whether the extension takes these rows: float32 on the CPU, plain RoPE, full-precision caches."""
        return (mx.default_device() == mx.cpu and q.dtype == mx.float32 and type(self.rope) is nn.RoPE
                and self.head_dim % 8 == 0 and self.head_dim <= 128 and cpu_kernel.extension() is not None
                and all(c is not None and c.bits is None for c in caches))

    def _decode(self, q: mx.array, k: mx.array, v: mx.array, caches: Sequence) -> mx.array:
        """q, k, v: [rows, heads, 1, D], one new token per row; each row's cache takes its key and value."""
        positions = mx.array([c.prepare(1) for c in caches])
        q, k = self.rope(q, offset=positions), self.rope(k, offset=positions)
        keys, values = [], []
        for i, cache in enumerate(caches):
            ki, vi = cache.update_and_fetch(k[i : i + 1], v[i : i + 1])
            keys.append(ki)
            values.append(vi)
        return cpu_kernel.extension().decode_attention(q, keys, values, self.scale, stream=mx.cpu)

