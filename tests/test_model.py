"""Numerical parity of our MLX port with transformers.Lfm2ForCausalLM (float32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import lfm_mlx
from conftest import relative_error, write_checkpoint

BOUND = 1e-4  # max |ours - theirs| / max |theirs|


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def incremental_logits(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill ``prefill`` tokens at once, then feed the rest one token at a time through the caches."""
    cache = lfm_mlx.make_cache(model)
    parts = [np.array(model(mx.array(ids[:, :prefill]), cache=cache))]
    for i in range(prefill, ids.shape[1]):
        parts.append(np.array(model(mx.array(ids[:, i : i + 1]), cache=cache)))
    return np.concatenate(parts, axis=1)


def greedy_tokens(model, prompt: np.ndarray, n: int) -> list[int]:
    cache = lfm_mlx.make_cache(model)
    logits = model(mx.array(prompt), cache=cache)
    out = []
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def torch_greedy(model, prompt: np.ndarray, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
    return out[0, prompt.shape[1]:].tolist()


@pytest.fixture(scope="module")
def ids_350m():
    return np.random.default_rng(0).integers(0, 65536, size=(2, 48))


@pytest.fixture(scope="module")
def mlx_350m(checkpoint_350m):
    return lfm_mlx.load_model(checkpoint_350m, dtype="float32")


def test_full_forward_matches_transformers_at_350m_shape(mlx_350m, torch_model_350m, ids_350m):
    err = relative_error(np.array(mlx_350m(mx.array(ids_350m))), torch_logits(torch_model_350m, ids_350m))
    print(f"350M full-forward relative max error: {err:.3e}")
    assert err <= BOUND


def test_prefill_then_token_by_token_matches_transformers_at_350m_shape(mlx_350m, torch_model_350m, ids_350m):
    err = relative_error(incremental_logits(mlx_350m, ids_350m, 20), torch_logits(torch_model_350m, ids_350m))
    print(f"350M incremental relative max error: {err:.3e}")
    assert err <= BOUND


def test_32_greedy_tokens_equal_transformers_generate_at_350m_shape(mlx_350m, torch_model_350m, ids_350m):
    prompt = ids_350m[:1, :12]
    assert greedy_tokens(mlx_350m, prompt, 32) == torch_greedy(torch_model_350m, prompt, 32)


def test_tiny_model_matches_transformers_full_and_incremental(tiny_checkpoint, torch_model_tiny):
    model = lfm_mlx.load_model(tiny_checkpoint, dtype="float32")
    ids = np.random.default_rng(1).integers(0, 65536, size=(3, 40))
    ref = torch_logits(torch_model_tiny, ids)
    assert relative_error(np.array(model(mx.array(ids))), ref) <= BOUND
    assert relative_error(incremental_logits(model, ids, 1), ref) <= BOUND
    assert relative_error(incremental_logits(model, ids, 33), ref) <= BOUND
    prompt = ids[:1, :5]
    assert greedy_tokens(model, prompt, 32) == torch_greedy(torch_model_tiny, prompt, 32)


SMALL = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, intermediate_size=160, max_position_embeddings=2048)

# Key spellings and options that real checkpoints and transformers.Lfm2Config use.
CONFIG_VARIANTS = {
    "layer_types": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "full_attn_idxs": dict(full_attn_idxs=[1, 3]),
    "no_pattern_means_all_attention": dict(),
    "rope_parameters_theta": dict(full_attn_idxs=[0], rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "untied_lm_head": dict(full_attn_idxs=[1], tie_word_embeddings=False),
    "legacy_tie_embedding_key": dict(full_attn_idxs=[1], tie_embedding=False),
    "legacy_block_ff_dim_key": dict(full_attn_idxs=[1], block_ff_dim=100),
    "conv_bias": dict(full_attn_idxs=[2], conv_bias=True),
    "no_ff_auto_adjust": dict(full_attn_idxs=[2], block_auto_adjust_ff_dim=False),
    "ffn_multiplier_and_multiple_of": dict(full_attn_idxs=[2], block_ffn_dim_multiplier=1.5, block_multiple_of=32),
    "conv_width_4": dict(full_attn_idxs=[2], conv_L_cache=4),
    "explicit_head_dim": dict(full_attn_idxs=[2], head_dim=32),
    "linear_rope": dict(full_attn_idxs=[1], rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
    "yarn_rope": dict(full_attn_idxs=[1], rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 512}),
    "llama3_rope": dict(full_attn_idxs=[1], rope_parameters={
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 512}),
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_any_transformers_config_loads_and_matches(variant, tmp_path):
    from transformers import Lfm2ForCausalLM

    path = write_checkpoint(tmp_path, {**SMALL, **CONFIG_VARIANTS[variant]}, seed=3)
    ours = lfm_mlx.load_model(path, dtype="float32")
    theirs = Lfm2ForCausalLM.from_pretrained(path, dtype="float32").eval()
    ids = np.random.default_rng(2).integers(0, 300, size=(1, 600 if "rope" in variant else 24))
    ref = torch_logits(theirs, ids)
    assert relative_error(np.array(ours(mx.array(ids))), ref) <= BOUND
    assert relative_error(incremental_logits(ours, ids[:, :40], 17), ref[:, :40]) <= BOUND


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", mx.bfloat16])
def test_half_precision_loads_and_tracks_float32(tiny_checkpoint, dtype):
    ids = mx.array(np.random.default_rng(4).integers(0, 65536, size=(1, 16)))
    ref = np.array(lfm_mlx.load_model(tiny_checkpoint, dtype="float32")(ids))
    model = lfm_mlx.load_model(tiny_checkpoint, dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == (dtype if isinstance(dtype, mx.Dtype) else getattr(mx, dtype))
    assert relative_error(np.array(model(ids).astype(mx.float32)), ref) < 5e-2
