"""The CPU fast paths give the plain path's answer: the SIMD kernel and dequantize-then-matmul prefill."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import lfm_mlx
from conftest import GREEDY, relative_error
from lfm_mlx import cpu_kernel, quantized


def quantized_layer(n: int, k: int, bits: int, group_size: int, seed: int = 0) -> nn.Module:
    layer = quantized.Linear(k, n, bias=False)
    layer.weight = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05
    return layer.to_quantized(group_size, bits)


@pytest.fixture(autouse=True)
def kernel_for_every_size(monkeypatch):
    """The tiny models' layers are below the kernel's size threshold: lower it so they exercise it."""
    monkeypatch.setattr(cpu_kernel, "MIN_WEIGHTS", 0)


def use_plain_paths(monkeypatch) -> None:
    """MLX's own quantized_matmul at any number of rows."""
    monkeypatch.setattr(quantized, "DEQUANTIZE_MIN_ROWS", 1 << 30)
    monkeypatch.setattr(cpu_kernel, "applies", lambda x, layer: False)


def test_quantized_layers_take_the_fast_classes(tiny_4bit):
    assert isinstance(tiny_4bit.layers[0].feed_forward.w1, quantized.QuantizedLinear)
    assert isinstance(tiny_4bit.model.embed_tokens, quantized.QuantizedEmbedding)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (4, 128), (8, 64)])
def test_cpu_kernel_equals_mlx_quantized_matmul_and_rows_are_independent(bits, group_size):
    if cpu_kernel.library() is None:
        pytest.skip("no C compiler here: the model uses mx.quantized_matmul, which the other tests cover")
    layer = quantized_layer(320, 512, bits, group_size)
    x = mx.random.normal((16, 512), key=mx.random.key(1))
    assert cpu_kernel.applies(x, layer)
    ref = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                              group_size=group_size, bits=bits)
    rows = mx.concatenate([cpu_kernel.quantized_matmul(x[i : i + 1], layer)[0] for i in range(16)])
    for m in (1, 3, 4, 5, 16):
        out = cpu_kernel.quantized_matmul(x[:m], layer)[0]
        assert relative_error(out, ref[:m]) < 1e-5
        # Bit-identical whatever the rows beside it: verification passes equal one-token steps.
        assert mx.array_equal(out, rows[:m]).item()


def test_project_equals_each_layer_alone_quantized_or_not():
    """q/k/v and gate/up share one read of x on the CPU kernel; the answer is each layer's own."""
    x = mx.random.normal((1, 3, 256), key=mx.random.key(4))
    biased = quantized.Linear(256, 64, bias=True)
    biased.bias = mx.random.normal((64,), key=mx.random.key(5))
    layers = [quantized_layer(128, 256, 4, 64), quantized_layer(64, 256, 8, 64, seed=1),
              biased.to_quantized(64, 4)]
    for group in (layers, [quantized.Linear(256, 32)]):
        outs = quantized.project(x, *group)
        assert len(outs) == len(group)
        for out, layer in zip(outs, group):
            assert out.shape == (1, 3, layer.weight.shape[0])
            assert relative_error(out, layer(x)) < 1e-6


def test_small_layers_stay_on_mlx_kernel(monkeypatch):
    """Leaving MLX costs a round trip that small products do not repay (the demo model's layers)."""
    if cpu_kernel.library() is None:
        pytest.skip("no C compiler here: every layer uses mx.quantized_matmul")
    monkeypatch.undo()
    x = mx.random.normal((1, 1024))
    assert not cpu_kernel.applies(x, quantized_layer(64, 1024, 4, 64))
    assert cpu_kernel.applies(x, quantized_layer(256, 1024, 4, 64))


def test_quantized_layers_work_inside_mx_compile():
    """Compiled code has no values to hand to the C kernel: MLX's own kernel takes over there."""
    layer = quantized_layer(64, 128, 4, 64)
    x = mx.random.normal((2, 128), key=mx.random.key(8))
    assert relative_error(mx.compile(layer)(x), layer(x)) < 1e-5


def test_without_a_compiler_the_model_uses_mlx_quantized_matmul(monkeypatch, tmp_path):
    monkeypatch.setenv("LFM_MLX_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "false")  # a "compiler" that always fails
    assert cpu_kernel._build() is None
    monkeypatch.setattr(cpu_kernel, "_library", None)
    monkeypatch.setattr(cpu_kernel, "_tried", True)
    layer = quantized_layer(64, 128, 4, 64)
    x = mx.random.normal((1, 1, 128), key=mx.random.key(9))
    assert not cpu_kernel.applies(x, layer)
    ref = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True)
    assert mx.array_equal(layer(x), ref).item()


def test_dequantized_matmul_equals_quantized_matmul_including_sliced_heads(monkeypatch):
    layer = quantized_layer(1000, 256, 4, 64)
    x = mx.random.normal((2, 40, 256), key=mx.random.key(2))
    ref = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True)
    assert relative_error(quantized.dequantized_matmul(x, layer), ref) < 1e-5
    monkeypatch.setattr(quantized, "MAX_DEQUANTIZED_ELEMENTS", 256 * 300)  # 4 slices of rows
    assert relative_error(quantized.dequantized_matmul(x, layer), ref) < 1e-5
    embedding = quantized.Embedding(1000, 256).to_quantized(64, 8)
    ref = mx.quantized_matmul(x, embedding.weight, embedding.scales, embedding.biases, transpose=True, bits=8)
    assert relative_error(embedding.as_linear(x), ref) < 1e-5


@pytest.mark.parametrize("bits", [3, 6])
def test_dequantized_matmul_at_odd_bits_is_exact_in_bounded_memory(bits, monkeypatch):
    """3/5/6-bit weights go through mx.dequantize, whose temporaries are many times its output:
    slices are evaluated one at a time, also under mx.compile (where they cannot be)."""
    monkeypatch.setattr(quantized, "MAX_DEQUANTIZED_ELEMENTS", 1 << 20)
    layer = quantized_layer(2048, 1024, bits, 64)
    x = mx.random.normal((1, 64, 1024), key=mx.random.key(3))
    mx.eval(layer.parameters(), x)
    ref = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True, bits=bits)
    mx.eval(ref)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = quantized.dequantized_matmul(x, layer)
    mx.eval(out)
    dequantized_weight = 2048 * 1024 * 4
    assert mx.get_peak_memory() - base < dequantized_weight  # 1/16 of it per slice, plus temporaries
    assert relative_error(out, ref) < 1e-5
    assert relative_error(mx.compile(lambda a: quantized.dequantized_matmul(a, layer))(x), ref) < 1e-5


def test_quantized_model_fast_paths_match_plain_logits(tiny_4bit, monkeypatch):
    use_plain_paths(monkeypatch)
    ids = mx.array(np.random.default_rng(0).integers(100, 60000, size=(1, 40)))
    plain_full = tiny_4bit(ids)
    cache = lfm_mlx.make_cache(tiny_4bit)
    plain_steps = mx.concatenate([tiny_4bit(ids[:, :33], cache=cache)] +
                                 [tiny_4bit(ids[:, i : i + 1], cache=cache) for i in range(33, 40)], axis=1)
    monkeypatch.undo()  # the fast paths again
    fast_full = tiny_4bit(ids)  # 40 rows: dequantize-then-matmul
    cache = lfm_mlx.make_cache(tiny_4bit)
    fast_steps = mx.concatenate([tiny_4bit(ids[:, :33], cache=cache)] +
                                [tiny_4bit(ids[:, i : i + 1], cache=cache) for i in range(33, 40)], axis=1)
    assert relative_error(fast_full, plain_full) < 1e-4
    assert relative_error(fast_steps, plain_steps) < 1e-4
    assert mx.array_equal(fast_full.argmax(-1), plain_full.argmax(-1)).item()


@pytest.mark.parametrize("which", ["float", "4-bit"])
def test_fast_paths_generate_the_plain_greedy_tokens(which, tiny, tiny_4bit, monkeypatch):
    model = tiny[0] if which == "float" else tiny_4bit
    tok = tiny[1]
    prompt = np.random.default_rng(1).integers(100, 60000, size=90).tolist()
    opts = dict(max_tokens=24, **GREEDY)
    fast = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, **opts)]
    use_plain_paths(monkeypatch)
    plain = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, **opts)]
    assert fast == plain
