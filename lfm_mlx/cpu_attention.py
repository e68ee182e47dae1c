"""Attention on MLX's CPU backend: decoding rows in one graph node, prompt chunks with a fast softmax.

Each sequence decoding one token attends to its own cache. MLX's CPU attention is several nodes per
sequence and layer (RoPE, the cache writes, the attention itself), ~0.5 ms each: with 16 sequences
decoding, attention took longer than all the step's matrix products. Here the rows' RoPE is one node
(a position per row: ``CPURoPE``), and the attention of every row is one node of lfm_mlx's CPU
extension (``decode_attention``), which also writes each row's new key and value into its cache's
buffers, in place (a cache's buffers are its own).

A prompt chunk's attention is two matrix products around a softmax, and MLX's CPU exp is a scalar
loop: the softmax of a 512-token chunk cost ten times both products. Here the products stay MLX's
(BLAS) and the masked softmax is the extension's (``causal_softmax``), a block of queries at a time
so the scores of a long context stay bounded.

Quantized KV caches, other RoPE variants and other devices keep the model's own path. ``accelerate``
(``lfm_mlx.quantized``) gives the model's attention layers this class at load time.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernel
from .cache import Rows
from .model import Attention

SCORES_PER_BLOCK = 1 << 25  # floats of attention scores a prompt chunk holds at once (128 MB)


class CPURoPE(nn.RoPE):
    """On the CPU, the extension's RoPE for [B, H, T, D] float32 inputs: one graph node where MLX's CPU
    fallback makes about thirty (positions, frequencies, cos, sin, the halves' products)."""

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if (mx.default_device() == mx.cpu and x.dtype == mx.float32 and x.ndim == 4 and not self.traditional
                and cpu_kernel.extension() is not None):
            given = isinstance(offset, mx.array)
            return cpu_kernel.extension().rope(x, self.dims, self.base, self.scale, 0 if given else int(offset),
                                               offset if given else None, stream=mx.cpu)
        return super().__call__(x, offset)


class CPUAttention(Attention):
    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        if q.shape[0] == 1 and q.shape[2] == 1 and self._takes(q, [cache]):
            return self._decode(q.transpose(2, 1, 0, 3), k.transpose(2, 1, 0, 3), v.transpose(2, 1, 0, 3),
                                [cache]).transpose(2, 1, 0, 3)
        if mask == "causal" and self._takes(q, [cache], prompt=True):
            return self._prompt_chunk(q, k, v, cache)
        return super()._attend(q, k, v, mask, cache)

    def _attend_rows(self, q: mx.array, k: mx.array, v: mx.array, rows: Rows) -> mx.array:
        # The engine puts decoding rows (one token each) first, then prompt chunks.
        n = next((i for i, length in enumerate(rows.lengths) if length != 1), len(rows.lengths))
        if n == 0 or not self._takes(q, rows.caches[:n]):
            return super()._attend_rows(q, k, v, rows)
        part = [x[:, :, :n].transpose(2, 1, 0, 3) for x in (q, k, v)]  # [n, heads, 1, D]
        out = self._decode(*part, rows.caches[:n]).transpose(2, 1, 0, 3)
        if n == len(rows.lengths):
            return out
        rest = Rows(rows.caches[n:], rows.lengths[n:])
        return mx.concatenate([out, super()._attend_rows(q[:, :, n:], k[:, :, n:], v[:, :, n:], rest)], axis=2)

    def _takes(self, q: mx.array, caches: Sequence, prompt: bool = False) -> bool:
        """Whether the extension takes these rows: float32 on the CPU, plain RoPE, full-precision caches
        (a prompt may have none)."""
        return (mx.default_device() == mx.cpu and q.dtype == mx.float32 and type(self.rope) in (nn.RoPE, CPURoPE)
                and self.head_dim % 8 == 0 and self.head_dim <= 128 and cpu_kernel.extension() is not None
                and all((c is None and prompt) or (c is not None and c.bits is None) for c in caches))

    def _prompt_chunk(self, q: mx.array, k: mx.array, v: mx.array, cache) -> mx.array:
        """q, k, v: [B, heads, L, D], L new tokens after the cache's (if any), causally masked."""
        position = 0 if cache is None else cache.prepare(q.shape[2])
        q, k = self.rope(q, offset=position), self.rope(k, offset=position)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        B, H, L, D = q.shape
        kv_heads, S = k.shape[1], k.shape[2]
        keys_t, values = k[:, :, None].swapaxes(-1, -2), v[:, :, None]  # [B, kv heads, 1, ...]: GQA broadcasts
        step = max(1, SCORES_PER_BLOCK // (B * H * S))
        outs = []
        for start in range(0, L, step):
            part = q[:, :, start : start + step]
            n = part.shape[2]
            scores = part.reshape(B, kv_heads, H // kv_heads, n, D) @ keys_t
            probs = cpu_kernel.extension().causal_softmax(scores, self.scale, S - L + start, stream=mx.cpu)
            outs.append((probs @ values).reshape(B, H, n, D))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)

    def _decode(self, q: mx.array, k: mx.array, v: mx.array, caches: Sequence) -> mx.array:
        """q, k, v: [rows, heads, 1, D], one new token per row; each row's key and value are written into
        its cache's buffers by the same node that attends (no slice or update op per row)."""
        positions = mx.array([c.prepare(1) for c in caches])
        q, k = self.rope(q, offset=positions), self.rope(k, offset=positions)
        for cache in caches:
            cache.make_room(1, k)
        out, *buffers = cpu_kernel.extension().decode_attention(
            q, k, v, [c.keys[0] for c in caches], [c.values[0] for c in caches], [c.offset + 1 for c in caches],
            self.scale, stream=mx.cpu)
        for cache, keys, values in zip(caches, buffers[: len(caches)], buffers[len(caches) :]):
            cache.written(keys, values, 1)
        return out
