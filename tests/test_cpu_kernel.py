"""The CPU fast paths give the plain path's answer: lfm_mlx's quantized product (an MLX primitive, float
and int8 activations) and dequantize-then-matmul prefill."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import lfm_mlx
from conftest import GREEDY, relative_error
from lfm_mlx import cpu_attention, cpu_kernel, model as architecture, quantized
from lfm_mlx.cache import batch_rows


def quantized_layer(n: int, k: int, bits: int, group_size: int, seed: int = 0) -> nn.Module:
    layer = nn.Linear(k, n, bias=False)
    layer.weight = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05
    return quantized.accelerate(layer.to_quantized(group_size, bits))


def needs_kernel():
    if cpu_kernel.extension() is None:
        pytest.skip("the CPU kernel cannot be built here (no compiler or CMake): "
                    "the model uses mx.quantized_matmul, which the other tests cover")


def use_plain_paths(monkeypatch) -> None:
    """MLX's own quantized_matmul at any number of rows."""
    monkeypatch.setattr(quantized, "DEQUANTIZE_MIN_ROWS", 1 << 30)
    monkeypatch.setattr(cpu_kernel, "_module", None)
    monkeypatch.setattr(cpu_kernel, "_tried", True)


def int8_reference(x: np.ndarray, layer) -> np.ndarray:
    """The int8 path's arithmetic in NumPy, exactly: x per 64 values as two int8 digits
    (128 * q1 + q2 in steps of max|x| / 127 / 128), integer dot products with the 4/8-bit codes per
    block, then scales and biases in float64."""
    bits, gs = layer.bits, layer.group_size
    codes = np.asarray(layer.weight).view(np.uint8)
    q_w = np.stack([codes & 15, codes >> 4], -1).reshape(codes.shape[0], -1) if bits == 4 else codes
    scales, biases = np.asarray(layer.scales, np.float64), np.asarray(layer.biases, np.float64)
    blocks = x.reshape(x.shape[0], -1, cpu_kernel.BLOCK).astype(np.float32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    t = blocks * np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
    q1 = np.rint(t)
    q2 = np.rint((t - q1) * np.float32(128))
    assert np.abs(q1).max() <= 127 and np.abs(q2).max() <= 64  # each digit fits an int8
    q_x = (128 * q1 + q2).astype(np.int64)
    d = (amax / np.float32(127) / np.float32(128)).astype(np.float64)[..., 0]  # (M, blocks)
    # Per stretch of 32 (a block and a group both hold whole stretches): integer dots, then floats.
    stretch_d = np.repeat(d, cpu_kernel.BLOCK // 32, axis=1)  # (M, K / 32)
    q_x = q_x.reshape(q_x.shape[0], -1, 32)
    dots = np.einsum("msk,nsk->mns", q_x, q_w.reshape(q_w.shape[0], -1, 32).astype(np.int64))
    w_scale = np.repeat(scales, gs // 32, axis=1)  # (N, K / 32)
    w_bias = np.repeat(biases, gs // 32, axis=1)
    return (dots * stretch_d[:, None, :] * w_scale[None]).sum(-1) + ((q_x.sum(-1) * stretch_d) @ w_bias.T)


def test_the_architecture_is_plain_mlx_and_loading_swaps_in_the_fast_products(tiny_4bit):
    plain = architecture.Model(tiny_4bit.args)
    assert type(plain.layers[0].feed_forward.w1) is nn.Linear
    assert type(plain.model.embed_tokens) is nn.Embedding
    assert isinstance(tiny_4bit.layers[0].feed_forward.w1, quantized.QuantizedLinear)
    assert isinstance(tiny_4bit.model.embed_tokens, quantized.QuantizedEmbedding)
    assert type(plain.layers[0].feed_forward.act) is nn.SiLU
    assert isinstance(tiny_4bit.layers[0].feed_forward.act, quantized.SiLU)
    attention = next(layer.self_attn for layer in tiny_4bit.layers if layer.is_attention)
    assert type(attention) is cpu_attention.CPUAttention
    assert type(next(layer.self_attn for layer in plain.layers if layer.is_attention)) is architecture.Attention


def test_decode_attention_writes_each_rows_token_and_equals_mlx_attention_row_by_row():
    """One query per sequence against its own buffers (different lengths, room to spare, one longer
    than a thread's share), after writing its new key and value at its position; the buffers come back
    as outputs (in place, so that later readers follow the write)."""
    needs_kernel()
    key = iter(mx.random.split(mx.random.key(11), 64))
    lengths = [1, 7, 300, 64, 2000]
    q = mx.random.normal((len(lengths), 16, 1, 64), key=next(key))
    new_keys = mx.random.normal((len(lengths), 8, 1, 64), key=next(key))
    new_values = mx.random.normal((len(lengths), 8, 1, 64), key=next(key))
    keys = [mx.random.normal((1, 8, n + 40 * (i % 2), 64), key=next(key)) * 3 for i, n in enumerate(lengths)]
    values = [mx.random.normal((1, 8, n + 40 * (i % 2), 64), key=next(key)) for i, n in enumerate(lengths)]
    mx.eval(keys, values)
    before = [np.array(k) for k in keys]
    out, *buffers = cpu_kernel.extension().decode_attention(q, new_keys, new_values, keys, values, lengths, 0.125,
                                                            stream=mx.cpu)
    mx.eval(out, buffers)
    for i, n in enumerate(lengths):
        k, v = buffers[i], buffers[len(lengths) + i]
        assert mx.array_equal(k[:, :, n - 1], new_keys[i : i + 1, :, 0]).item()
        assert mx.array_equal(v[:, :, n - 1], new_values[i : i + 1, :, 0]).item()
        kept = np.delete(np.array(k), n - 1, axis=2)  # every other position as it was
        assert np.array_equal(kept, np.delete(before[i], n - 1, axis=2))
        ref = mx.fast.scaled_dot_product_attention(q[i : i + 1], k[:, :, :n], v[:, :, :n], scale=0.125)
        assert relative_error(out[i : i + 1], ref) < 1e-5
    with pytest.raises(ValueError, match="B buffers and lengths"):
        cpu_kernel.extension().decode_attention(q, new_keys, new_values, keys[:2], values[:2], lengths[:2], 0.125,
                                                stream=mx.cpu)
    with pytest.raises(ValueError, match="capacity >= length"):
        cpu_kernel.extension().decode_attention(q, new_keys, new_values, keys, values, [2, 7, 300, 64, 2000], 0.125,
                                                stream=mx.cpu)


def test_decoding_rows_attention_equals_the_models_own(tiny, monkeypatch):
    """Decoding rows beside a prompt chunk, through the engine's ragged batch: the CPU attention gives
    the model's own attention's logits, and a row's logits are those of its step alone."""
    needs_kernel()
    model = tiny[0]
    prompts = [list(range(100 + 7 * i, 130 + 9 * i)) for i in range(3)]

    def prefilled(prompt: list) -> list:
        cache = lfm_mlx.make_cache(model)
        mx.eval(model(mx.array([prompt]), cache=cache))
        return cache

    def run() -> tuple:
        feeds = [[5], [6], [7], list(range(200, 211))]
        caches = [prefilled(p) for p in prompts] + [lfm_mlx.make_cache(model)]
        batch = model(mx.array([[t for f in feeds for t in f]]), cache=batch_rows(caches, [len(f) for f in feeds]))
        alone = model(mx.array([[6]]), cache=prefilled(prompts[1]))
        return batch, alone

    fast_batch, fast_alone = run()
    assert relative_error(fast_batch[:, 1], fast_alone[:, 0]) < 1e-5
    monkeypatch.setattr(cpu_attention.CPUAttention, "_takes", lambda self, q, caches, prompt=False: False)
    plain_batch, plain_alone = run()
    assert relative_error(fast_batch, plain_batch) < 1e-5
    assert relative_error(fast_alone, plain_alone) < 1e-5


def test_causal_softmax_equals_mlx_softmax_under_the_mask():
    needs_kernel()
    scores = mx.random.normal((2, 3, 37, 61), key=mx.random.key(12)) * 30  # large enough to overflow e^x
    for offset in (0, 24, 100):
        ours = cpu_kernel.extension().causal_softmax(scores, 0.7, offset, stream=mx.cpu)
        visible = mx.arange(37)[:, None] + offset >= mx.arange(61)[None]
        ref = mx.softmax(mx.where(visible, scores * 0.7, -mx.inf), axis=-1)
        assert relative_error(ours, ref) < 1e-6 and mx.all(mx.where(visible, 0, ours) == 0).item()
    for scale, offset in ((0.7, -1), (-0.7, 0)):
        with pytest.raises(ValueError, match="scale > 0, offset >= 0"):
            cpu_kernel.extension().causal_softmax(scores, scale, offset, stream=mx.cpu)


def test_prompt_chunks_attention_equals_the_models_own(tiny, monkeypatch):
    """A prompt in one chunk and in two (the second after a cached prefix), also with the queries cut
    into blocks as a long context's are: the logits of the model's own attention."""
    needs_kernel()
    model = tiny[0]
    prompt = [(37 * i) % 250 + 3 for i in range(150)]

    def run() -> list:
        whole = model(mx.array([prompt]), cache=lfm_mlx.make_cache(model))
        cache = lfm_mlx.make_cache(model)
        first = model(mx.array([prompt[:61]]), cache=cache)
        return [whole, mx.concatenate([first, model(mx.array([prompt[61:]]), cache=cache)], axis=1)]

    fast = run()
    monkeypatch.setattr(cpu_attention, "SCORES_PER_BLOCK", 4000)  # blocks of a few queries
    blocks = run()
    monkeypatch.setattr(cpu_attention.CPUAttention, "_takes", lambda self, q, caches, prompt=False: False)
    plain = run()
    for ours in fast + blocks:
        assert relative_error(ours, plain[0]) < 1e-5


def test_vectorized_silu_is_as_exact_as_mlx_and_keeps_nan_and_extremes():
    needs_kernel()
    x = mx.concatenate([mx.random.normal((3001,), key=mx.random.key(4)) * 6,
                        mx.array([-3e38, -200.0, -87.5, -1e-8, 0.0, 1e-8, 88.5, 200.0, 3e38])])
    exact = np.asarray(x, np.float64) / (1 + np.exp(-np.asarray(x, np.float64).clip(-700, 700)))
    ours = np.asarray(quantized.SiLU()(x), np.float64)
    tiny = np.abs(exact) < 1e-30  # far below zero: both are 0 to float precision
    assert np.all(np.abs(ours[tiny]) < 1e-30)
    assert (np.abs(ours - exact)[~tiny] / np.abs(exact[~tiny])).max() < 1e-6
    assert np.isnan(np.asarray(quantized.SiLU()(mx.array([np.nan])))).all()
    strided = mx.random.normal((64, 48), key=mx.random.key(5)).T  # a transposed view
    assert relative_error(quantized.SiLU()(strided), nn.silu(strided)) < 1e-6


@pytest.mark.parametrize("offset", [0, 37, -12, "per row"])
def test_rope_is_one_node_as_exact_as_mlxs_and_rows_are_independent(offset):
    needs_kernel()
    from lfm_mlx.cpu_attention import CPURoPE

    x = mx.random.normal((3, 4, 5, 64), key=mx.random.key(8)) * 2
    for dims, base, scale in ((64, 1e6, 1.0), (32, 10_000.0, 0.5)):
        rope = nn.RoPE(dims, base=base, scale=scale)
        offsets = mx.array([3, 0, 900]) if offset == "per row" else offset
        ours = CPURoPE.__call__(rope, x, offsets)
        # Against float64: as close as MLX's own (float32 angles at position 900 carry ~1e-4 rad).
        position = np.arange(5)[None, :] + np.reshape(np.array([3, 0, 900]) if offset == "per row" else [offset] * 3, (3, 1))
        theta = (position * scale)[:, None, :, None] * base ** (-np.arange(dims // 2) / (dims // 2))
        x1, x2 = np.asarray(x[..., : dims // 2], np.float64), np.asarray(x[..., dims // 2 : dims], np.float64)
        exact = np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta), x1 * np.sin(theta) + x2 * np.cos(theta),
                                np.asarray(x[..., dims:], np.float64)], axis=-1)
        error = lambda y: np.abs(np.asarray(y, np.float64) - exact).max()
        assert error(ours) <= 1.5 * error(nn.RoPE.__call__(rope, x, offsets)) + 1e-6
        if dims < 64:  # what lies past dims passes through
            assert mx.array_equal(ours[..., dims:], x[..., dims:]).item()
        if offset == "per row":  # row b alone at its own position gives the same
            for b in range(3):
                alone = CPURoPE.__call__(rope, x[b : b + 1], int(offsets[b]))
                assert mx.array_equal(alone, ours[b : b + 1]).item()


@pytest.mark.parametrize("shape", [(1, 1024), (3, 5, 64), (513, 256), (2, 13)])
def test_rms_norm_is_one_node_as_exact_as_mlx_and_rows_are_independent(shape):
    needs_kernel()
    norm = nn.RMSNorm(shape[-1], eps=1e-5)
    norm.weight = mx.random.normal((shape[-1],), key=mx.random.key(6))
    x = mx.random.normal(shape, key=mx.random.key(7)) * 3
    ours = quantized.RMSNorm.__call__(norm, x)
    xd = np.asarray(x, np.float64)
    exact = xd / np.sqrt((xd**2).mean(-1, keepdims=True) + 1e-5) * np.asarray(norm.weight, np.float64)
    assert np.abs(np.asarray(ours, np.float64) - exact).max() / np.abs(exact).max() < 1e-6
    assert relative_error(ours, mx.fast.rms_norm(x, norm.weight, 1e-5)) < 1e-6
    rows = x.reshape(-1, shape[-1])
    alone = mx.concatenate([quantized.RMSNorm.__call__(norm, rows[i : i + 1]) for i in range(min(4, rows.shape[0]))])
    assert mx.array_equal(ours.reshape(-1, shape[-1])[: alone.shape[0]], alone).item()
    strided = x.reshape(-1, shape[-1]).T.T[:, ::-1]  # a view that is not row-contiguous
    assert relative_error(quantized.RMSNorm.__call__(norm, strided), mx.fast.rms_norm(strided, norm.weight, 1e-5)) < 1e-6


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (4, 128), (8, 64), (8, 32)])
def test_float_kernel_equals_mlx_quantized_matmul_and_rows_are_independent(bits, group_size):
    needs_kernel()
    layer = quantized_layer(320, 512, bits, group_size)
    x = mx.random.normal((16, 512), key=mx.random.key(1))
    ref = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                              group_size=group_size, bits=bits)
    for int8 in (False, True):
        rows = mx.concatenate([cpu_kernel.quantized_matmul(x[i : i + 1], layer, int8) for i in range(16)])
        for m in (1, 3, 4, 5, 16):
            out = cpu_kernel.quantized_matmul(x[:m], layer, int8)
            # Bit-identical whatever the rows beside it: verification passes equal one-token steps.
            assert mx.array_equal(out, rows[:m]).item()
        assert relative_error(rows, ref) < (1e-4 if int8 else 1e-5)


@pytest.fixture
def int8_path(request):
    """Runs the test on one of this machine's int8 kernels: the SIMD one (VNNI / AVX2 / plain C++), or
    AMX where it runs; AMX as it was afterwards."""
    needs_kernel()
    ext = cpu_kernel.extension()
    before = ext.amx()
    if request.param == "amx" and not before:
        pytest.skip("no Intel AMX here (CPU or OS): the SIMD int8 kernel is the one this machine runs")
    ext.amx(request.param == "amx")
    yield request.param
    ext.amx(before)


@pytest.mark.parametrize("int8_path", ["simd", "amx"], indirect=True)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (4, 128), (8, 64), (8, 32)])
def test_int8_kernel_is_exactly_the_rounded_product(bits, group_size, int8_path):
    """Each integer path against the same arithmetic in NumPy; and its distance from the float
    product, for the record."""
    layer = quantized_layer(256, 512, bits, group_size, seed=2)
    x = mx.random.normal((5, 512), key=mx.random.key(3))
    x[1, :64] = 0  # a block of zeros: no scale to divide by
    x[2, 64:128] = 1e4  # one large block beside normal ones
    out = cpu_kernel.quantized_matmul(x, layer, int8=True)
    assert relative_error(out, int8_reference(np.asarray(x), layer)) < 1e-5
    exact = cpu_kernel.quantized_matmul(x, layer, int8=False)
    assert relative_error(out[3:], exact[3:]) < 1e-4
    # The many-row path rounds the activations alike, so a row's result does not depend on its batch.
    rounded = quantized.dequantized_matmul(quantized.int8_rounded(x), layer)
    assert relative_error(out, rounded) < 1e-5


@pytest.mark.parametrize("bits,group_size,in_features", [(4, 64, 1152), (4, 128, 1152), (8, 64, 1152), (4, 32, 1152),
                                                         (4, 64, 2048), (8, 128, 2048)])
def test_amx_tiles_equal_the_simd_kernel_at_any_number_of_rows(bits, group_size, in_features):
    """AMX takes every product of the int8 path, from one decode row to a whole prompt (tiles of 16
    rows, the last one partial; one to eight rows share a tile between the two digits), with the
    SIMD kernel's integers; a row's result is bit-identical whatever rows share its product. At 2048
    inputs, 300 rows' digits (1.2 MB) are over the 1 MB kept in L2, so the blocks go in two ranges
    (26 and 6) whose sums carry over; fewer rows take one range."""
    needs_kernel()
    ext = cpu_kernel.extension()
    if not ext.amx():
        pytest.skip("no Intel AMX here (CPU or OS): the SIMD int8 kernel is the one this machine runs")
    layer = quantized_layer(336, in_features, bits, group_size, seed=4)  # 21 tiles of weight rows
    scale = mx.random.uniform(0.1, 3, (300, 1), key=mx.random.key(6))
    x = mx.random.normal((300, in_features), key=mx.random.key(5)) * scale
    try:
        ext.amx(False)
        simd = cpu_kernel.quantized_matmul(x, layer, int8=True)
        ext.amx(True)
        amx = cpu_kernel.quantized_matmul(x, layer, int8=True)
        assert relative_error(amx, simd) < 1e-6
        for m in (1, 2, 5, 8, 9, 16, 17, 40, 260, 275, 290, 300):
            assert mx.array_equal(cpu_kernel.quantized_matmul(x[:m], layer, int8=True), amx[:m]).item(), m
        assert mx.array_equal(cpu_kernel.quantized_matmul(x[7:8], layer, int8=True), amx[7:8]).item()
        # Weight rows not in whole tiles of 16: the SIMD kernel takes the product.
        odd = quantized_layer(40, in_features, bits, group_size, seed=7)
        assert relative_error(cpu_kernel.quantized_matmul(x[:3], odd, int8=True),
                              int8_reference(np.asarray(x[:3]), odd)) < 1e-5
    finally:
        ext.amx(True)


def test_the_kernel_is_a_graph_node_compile_and_odd_shapes():
    needs_kernel()
    layer = quantized_layer(96, 128, 4, 64)
    x = mx.random.normal((2, 3, 128), key=mx.random.key(8))
    y = layer(x)
    assert y.shape == (2, 3, 96)
    assert relative_error(mx.compile(layer)(x), y) < 1e-6
    # A strided (transposed) input is made contiguous first.
    xt = mx.random.normal((128, 4), key=mx.random.key(9)).T
    assert relative_error(layer(xt), layer(mx.array(np.asarray(xt)))) == 0
    # K not a multiple of 64 at 4 bits: the float kernel runs instead of the int8 one.
    odd = quantized_layer(64, 96, 4, 32)
    assert not cpu_kernel.rounds_activations(odd)
    x = mx.random.normal((1, 96), key=mx.random.key(10))
    assert relative_error(odd(x), mx.quantized_matmul(x, odd.weight, odd.scales, odd.biases, transpose=True,
                                                      group_size=32)) < 1e-5


def test_without_the_kernel_the_model_uses_mlx_quantized_matmul(monkeypatch, tmp_path, capfd):
    """No CMake (or a failed build, or a nanobind that cannot take mlx arrays): one line, MLX's kernels."""
    monkeypatch.setenv("LFM_MLX_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_cmake", lambda: None)
    monkeypatch.setattr(cpu_kernel, "_module", None)
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    assert cpu_kernel.extension() is None
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cmake was not found" in err[0] and "MLX's own quantized kernels" in err[0]
    layer = quantized_layer(64, 128, 4, 64)
    x = mx.random.normal((1, 1, 128), key=mx.random.key(9))
    assert not cpu_kernel.applies(layer)
    ref = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True)
    assert mx.array_equal(layer(x), ref).item()
    assert cpu_kernel.extension() is None and capfd.readouterr().err == ""  # said once


def test_a_failed_build_is_one_line_and_leaves_nothing_half_built(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "SOURCES", tmp_path / "missing")
    with pytest.raises(cpu_kernel.BuildError, match="the build failed: .*qmm-build.log"):
        cpu_kernel._build(tmp_path / "qmm.so")
    assert [p.name for p in tmp_path.iterdir()] == ["qmm-build.log"]  # the log, and no library


def test_dequantized_matmul_equals_quantized_matmul_including_sliced_heads(monkeypatch):
    monkeypatch.setenv("LFM_MLX_INT8", "0")  # float activations: exact
    layer = quantized_layer(1000, 256, 4, 64)
    x = mx.random.normal((2, 40, 256), key=mx.random.key(2))
    ref = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True)
    assert relative_error(quantized.dequantized_matmul(x, layer), ref) < 1e-5
    monkeypatch.setattr(quantized, "MAX_DEQUANTIZED_ELEMENTS", 256 * 300)  # 4 slices of rows
    assert relative_error(quantized.dequantized_matmul(x, layer), ref) < 1e-5
    embedding = quantized.accelerate(nn.Embedding(1000, 256).to_quantized(64, 8))
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


@pytest.mark.parametrize("int8", ["0", "1"])
def test_quantized_model_fast_paths_match_plain_logits(int8, tiny_4bit, monkeypatch):
    ids = mx.array(np.random.default_rng(0).integers(100, 60000, size=(1, 40)))

    def full_and_steps():
        cache = lfm_mlx.make_cache(tiny_4bit)
        steps = mx.concatenate([tiny_4bit(ids[:, :33], cache=cache)] +
                               [tiny_4bit(ids[:, i : i + 1], cache=cache) for i in range(33, 40)], axis=1)
        return tiny_4bit(ids), steps

    with monkeypatch.context() as plain:
        use_plain_paths(plain)
        plain_full, plain_steps = full_and_steps()
    monkeypatch.setenv("LFM_MLX_INT8", int8)
    fast_full, fast_steps = full_and_steps()  # 40 rows: dequantize-then-matmul; then the kernel
    tolerance = 1e-4 if int8 == "0" else 2e-3  # int8 arithmetic: 15-bit activations
    assert relative_error(fast_full, plain_full) < tolerance
    assert relative_error(fast_steps, plain_steps) < tolerance
    # Prompt rows and decode rows take different paths but the same arithmetic.
    assert relative_error(fast_steps, fast_full) < 1e-4
    assert mx.array_equal(fast_full.argmax(-1), plain_full.argmax(-1)).item()


@pytest.mark.parametrize("int8", ["0", "1"])
@pytest.mark.parametrize("which", ["float", "4-bit"])
def test_fast_paths_generate_the_plain_greedy_tokens(which, int8, tiny, tiny_4bit, monkeypatch):
    monkeypatch.setenv("LFM_MLX_INT8", int8)
    model = tiny[0] if which == "float" else tiny_4bit
    tok = tiny[1]
    prompt = np.random.default_rng(1).integers(100, 60000, size=90).tolist()
    opts = dict(max_tokens=24, **GREEDY)
    fast = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, **opts)]
    use_plain_paths(monkeypatch)
    plain = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, **opts)]
    assert fast == plain


def test_the_extension_refuses_what_it_cannot_multiply_in_one_line():
    needs_kernel()
    ext = cpu_kernel.extension()
    w, s, b = mx.quantize(mx.ones((8, 64)), 64, 4)
    with pytest.raises(ValueError, match="inputs of width 32 against w 64 wide"):
        ext.quantized_matmul(mx.ones((1, 32)), w, s, b, 64, 4, True, stream=mx.cpu)
    with pytest.raises(ValueError, match="float32 x only"):
        ext.quantized_matmul(mx.ones((1, 64), dtype=mx.float16), w, s, b, 64, 4, True, stream=mx.cpu)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ext.dequantize(w, s, b, 64, 3, stream=mx.cpu)
