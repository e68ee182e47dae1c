"""LFM2 / LFM2.5: a hybrid of gated short convolutions and grouped-query attention, in MLX.

Layout and key names follow the Hugging Face checkpoints (``model.layers.N.conv.in_proj`` …), so
weights load without renaming; ``sanitize`` is the one place where checkpoint layout is adapted.
Layers are mlx's own (``nn.Linear``, ``nn.Embedding``, ``nn.SiLU``); loading swaps fast CPU products
into their quantized forms, a fast activation and decoding rows' attention (``lfm_mlx.quantized.accelerate``).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.rope_utils import initialize_rope

from .cache import Rows, split_rows
from .config import ModelArgs


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=False)
        self.q_layernorm = nn.RMSNorm(hd, eps=args.norm_eps)
        self.k_layernorm = nn.RMSNorm(hd, eps=args.norm_eps)
        self.rope = initialize_rope(
            hd, args.rope_theta, False, args.rope_scaling, args.max_position_embeddings
        )

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_layernorm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_layernorm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if isinstance(cache, Rows):
            out = self._attend_rows(q, k, v, cache)
        else:
            out = self._attend(q, k, v, mask, cache)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache) -> mx.array:
        position = 0 if cache is None else cache.prepare(q.shape[2])
        q = self.rope(q, offset=position)
        k = self.rope(k, offset=position)
        if cache is None:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        k, v = cache.update_and_fetch(k, v)
        if cache.bits is not None:
            return quantized_scaled_dot_product_attention(
                q, k, v, scale=self.scale, mask=mask, group_size=cache.group_size, bits=cache.bits
            )
        # GQA is native to the fused kernel: no repeat of K/V heads.
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)

    def _attend_rows(self, q: mx.array, k: mx.array, v: mx.array, rows: Rows) -> mx.array:
        """Several sequences laid end to end along L ([1, H, L, D]): each attends only to its own
        cache, at its own positions, with its own window and KV precision."""
        outs, start = [], 0
        for cache, n in zip(rows.caches, rows.lengths):
            part = slice(start, start + n)
            mask = "causal" if n > 1 else None
            outs.append(self._attend(q[:, :, part], k[:, :, part], v[:, :, part], mask, cache))
            start += n
        return mx.concatenate(outs, axis=2)


class DepthwiseCausalConv(nn.Module):
    """Depthwise causal conv as K shifted multiply-adds: cheaper than Conv1d for K = 3 and it reads
    the cached state directly. ``weight`` keeps MLX's Conv1d layout [C, K, 1] for interchange."""

    def __init__(self, channels: int, kernel_size: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, kernel_size, 1))
        if bias:
            self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        """``x``: [B, K - 1 + L, C] (state then new inputs) → [B, L, C]."""
        K = self.weight.shape[1]
        L = x.shape[1] - (K - 1)
        taps = self.weight[:, :, 0].T  # [K, C]
        if L == 1:
            y = (x * taps).sum(axis=1, keepdims=True)
        else:
            y = x[:, 0:L] * taps[0]
            for k in range(1, K):
                y = y + x[:, k : k + L] * taps[k]
        if "bias" in self:
            y = y + self.bias
        return y


class ShortConv(nn.Module):
    """Gated short convolution: in_proj → (B, C, x); out_proj(C · conv(B · x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.hidden_size
        self.kernel_size = args.conv_L_cache
        self.in_proj = nn.Linear(d, 3 * d, bias=args.conv_bias)
        self.conv = DepthwiseCausalConv(d, args.conv_L_cache, args.conv_bias)
        self.out_proj = nn.Linear(d, d, bias=args.conv_bias)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        b, c, h = mx.split(self.in_proj(x), 3, axis=-1)
        bx = b * h
        if isinstance(cache, Rows):
            y = self._conv_rows(bx, cache)
        else:
            y = self._conv(bx, cache)
        return self.out_proj(c * y)

    def _conv(self, bx: mx.array, cache) -> mx.array:
        if cache is None or cache.state is None:
            state = mx.zeros((bx.shape[0], self.kernel_size - 1, bx.shape[2]), bx.dtype)
        else:
            state = cache.state
        window = mx.concatenate([state, bx], axis=1)
        if cache is not None:
            last = window[:, window.shape[1] - (self.kernel_size - 1) :]
            # After a prompt chunk, a copy: a slice would keep the chunk's whole window alive.
            cache.state = mx.contiguous(last) if bx.shape[1] > 1 else last
            cache.offset += bx.shape[1]
            if cache.keep_window:
                cache.window = window
        return self.conv(window)

    def _conv_rows(self, bx: mx.array, rows: Rows) -> mx.array:
        """Several sequences laid end to end along L ([1, L, C]), each from its own state. One-token
        rows (decode steps) are stacked into one batch of windows: the common case costs a few ops."""
        outs, start, i = [], 0, 0
        caches, lengths = rows.caches, rows.lengths
        while i < len(caches):
            j = i
            while j < len(caches) and lengths[j] == 1 and caches[j].state is not None and not caches[j].keep_window:
                j += 1
            if j - i > 1:
                states = mx.concatenate([c.state for c in caches[i:j]])  # [G, K - 1, C]
                window = mx.concatenate([states, bx[0, start : start + j - i, None]], axis=1)
                for c, state in zip(caches[i:j], split_rows(window[:, 1:])):
                    c.state = state
                    c.offset += 1
                outs.append(self.conv(window).reshape(1, j - i, -1))
                start, i = start + j - i, j
            else:
                outs.append(self._conv(bx[:, start : start + lengths[i]], caches[i]))
                start, i = start + lengths[i], i + 1
        return mx.concatenate(outs, axis=1)


class MLP(nn.Module):
    def __init__(self, dim: int, ff_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ff_dim, bias=False)
        self.w3 = nn.Linear(dim, ff_dim, bias=False)
        self.w2 = nn.Linear(ff_dim, dim, bias=False)
        self.act = nn.SiLU()

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.w1(x), self.w3(x)
        return self.w2(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, is_attention: bool):
        super().__init__()
        self.is_attention = is_attention
        if is_attention:
            self.self_attn = Attention(args)
        else:
            self.conv = ShortConv(args)
        self.feed_forward = MLP(args.hidden_size, args.ff_dim)
        self.operator_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        if self.is_attention:
            h = x + self.self_attn(self.operator_norm(x), mask, cache)
        else:
            h = x + self.conv(self.operator_norm(x), cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LFM2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, t != "conv") for t in args.layer_types]
        self.embedding_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """``cache``: one cache per layer, or per layer the ``Rows`` of several sequences laid end to
        end in ``inputs`` [1, L] (the engine's ragged batch)."""
        h = self.embed_tokens(inputs)
        cache = cache or [None] * len(self.layers)
        mask = "causal" if h.shape[1] > 1 and not isinstance(cache[0], Rows) else None
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.embedding_norm(h)


class Model(nn.Module):
    """Causal LM head over ``LFM2Model``; ``model(ids [B, L], cache) -> logits [B, L, vocab]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LFM2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None) -> mx.array:
        return self.logits(self.model(inputs, cache))

    def logits(self, h: mx.array) -> mx.array:
        """The LM head: hidden states [..., hidden] → logits [..., vocab]."""
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    @property
    def layers(self) -> list:
        return self.model.layers

    def sanitize(self, weights: dict) -> dict:
        """HF stores the conv kernel as [C, 1, K]; MLX's layout is [C, K, 1]. A tied checkpoint may
        still carry an lm_head copy, which transformers ignores, and so do we."""
        out = {}
        for name, w in weights.items():
            if name.endswith("conv.conv.weight") and w.ndim == 3 and w.shape[1] == 1 and w.shape[2] > 1:
                w = w.transpose(0, 2, 1)
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            out[name] = w
        return out
