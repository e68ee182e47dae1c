"""Linear and embedding layers whose quantized form is fast on MLX's CPU backend too.

MLX's CPU ``quantized_matmul`` is a scalar loop over input rows: decode runs at ~1 ns per weight and a
512-token prefill costs as much as 512 decode steps (about 4 tok/s for LFM2-350M in 4-bit). So on the
CPU, a few rows go through lfm_mlx's kernel (``lfm_mlx.cpu_kernel``, a primitive of MLX's graph; on
CPUs with Intel AMX, all rows do), and many rows dequantize the weight once, as a transient float
matrix freed right after its product, and hand the product to BLAS. On a GPU MLX's quantized kernels are fast already and are used as they are.
``accelerate`` swaps these products (and a vectorized SiLU, one-node RMSNorm and RoPE) into a model's MLX layers at load time;
parameters and checkpoint keys stay mlx's own (``weight``, ``scales``, ``biases``).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernel
from .cpu_attention import CPUAttention, CPURoPE
from .model import Attention

# From this many input rows on (without the SIMD kernel), dequantize-then-matmul beats MLX's CPU
# quantized kernel: unpacking a weight costs about what 2-3 rows of its quantized matvec do.
DEQUANTIZE_MIN_ROWS = 4
# The tied LM head is 65536 x 1024: dequantize it in slices so the transient stays small.
MAX_DEQUANTIZED_ELEMENTS = 1 << 24


@lru_cache(maxsize=None)
def _affine_dequantizer(bits: int, group_size: int):
    """``mx.dequantize`` for affine bits in (2, 4, 8), as one fused elementwise kernel: on the CPU it
    runs about twice as fast as the generic op, with bit-identical results."""

    def dequantize(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        q = ((w[..., None] >> shifts) & ((1 << bits) - 1)).astype(scales.dtype)
        q = q.reshape(*w.shape[:-1], -1, group_size)
        return (q * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)

    return mx.compile(dequantize)


def dequantized_matmul(x: mx.array, layer: nn.Module) -> mx.array:
    """``x @ W.T`` for a quantized ``layer``, through float weights that live only for the product."""
    w, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    fused = layer.mode == "affine" and 32 % layer.bits == 0
    # mx.dequantize's generic path (3, 5, 6 bits, other modes) holds ~7x its output in temporaries.
    budget = MAX_DEQUANTIZED_ELEMENTS if fused else MAX_DEQUANTIZED_ELEMENTS // 8
    rows = max(1, budget // (w.shape[-1] * 32 // layer.bits))
    outs = []
    for i in range(0, w.shape[0], rows):
        ws, ss = w[i : i + rows], scales[i : i + rows]
        bs = None if biases is None else biases[i : i + rows]
        if fused and mx.default_device() == mx.cpu and cpu_kernel.applies(layer):
            weight = cpu_kernel.extension().dequantize(ws, ss, bs, layer.group_size, layer.bits, stream=mx.cpu)
        elif fused:
            weight = _affine_dequantizer(layer.bits, layer.group_size)(ws, ss, bs)
        else:
            weight = mx.dequantize(ws, ss, bs, layer.group_size, layer.bits, mode=layer.mode)
        outs.append(x @ weight.astype(x.dtype).T)
        if not fused:
            try:  # one slice's temporaries at a time: MLX would schedule them all at once
                mx.eval(outs[-1])
            except ValueError:  # inside mx.compile / vmap: no values to evaluate yet
                pass
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


@mx.compile
def int8_rounded(x: mx.array) -> mx.array:
    """``x`` as the CPU kernel's int8 arithmetic sees it: per 64 values, two int8 digits
    d * (128 * q1 + q2), d = max|x| / 127 / 128. The many-row path rounds alike, so a row's result
    does not depend on how many rows share its product."""
    blocks = x.reshape(*x.shape[:-1], -1, cpu_kernel.BLOCK)
    amax = mx.abs(blocks).max(axis=-1, keepdims=True)
    t = blocks * mx.where(amax > 0, 127 / amax, 0)
    q1 = mx.round(t)
    q2 = mx.round((t - q1) * 128)
    return ((q1 * 128 + q2) * (amax / 127 / 128)).reshape(x.shape)


def quantized_matmul(x: mx.array, layer: nn.Module) -> mx.array:
    """``x @ W.T`` for a quantized ``layer`` by the fastest path on the current device."""
    cpu = mx.default_device() == mx.cpu
    if cpu and x.dtype == mx.float32 and cpu_kernel.applies(layer):
        int8 = cpu_kernel.rounds_activations(layer)
        if x.size <= (cpu_kernel.INT8_MAX_ROWS if int8 else cpu_kernel.MAX_ROWS) * x.shape[-1] or \
                (int8 and cpu_kernel.amx()):
            return cpu_kernel.quantized_matmul(x, layer)
        return dequantized_matmul(int8_rounded(x) if int8 else x, layer)
    if cpu and x.size >= DEQUANTIZE_MIN_ROWS * x.shape[-1]:
        return dequantized_matmul(x, layer)
    return mx.quantized_matmul(
        x, layer["weight"], layer["scales"], layer.get("biases"), transpose=True,
        group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
    )


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self)


class SiLU(nn.SiLU):
    """On the CPU, the extension's vectorized SiLU: MLX's CPU exp is a scalar loop, ~35 ms for one
    512-token MLP activation of LFM2-350M (a fifth of the prefill), against ~1 ms."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.cpu and x.dtype == mx.float32 and cpu_kernel.extension() is not None:
            return cpu_kernel.extension().silu(x, stream=mx.cpu)
        return super().__call__(x)


class RMSNorm(nn.RMSNorm):
    """On the CPU, the extension's RMSNorm: one graph node where MLX's CPU fallback makes six, and
    there are 45 norms in a step of LFM2-350M."""

    def __call__(self, x: mx.array) -> mx.array:
        if (mx.default_device() == mx.cpu and x.dtype == mx.float32 and self.weight.dtype == mx.float32
                and cpu_kernel.extension() is not None):
            return cpu_kernel.extension().rms_norm(x, self.weight, self.eps, stream=mx.cpu)
        return super().__call__(x)


def accelerate(model: nn.Module) -> nn.Module:
    """Give ``model``'s layers the fast CPU paths above, RoPE and decoding rows' attention
    (``lfm_mlx.cpu_attention``), in place: the architecture keeps plain ``nn.Linear`` / ``nn.Embedding``
    / ``nn.SiLU`` / ``nn.RMSNorm`` / ``nn.RoPE`` and its own attention, and the subclasses add behaviour,
    no state."""
    swaps = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding, nn.SiLU: SiLU,
             nn.RMSNorm: RMSNorm, nn.RoPE: CPURoPE, Attention: CPUAttention}
    for _, module in model.named_modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
    return model
