"""Shared fixtures: random-weight checkpoints written by transformers, built once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "lfm2-reference"
LFM2_350M = SHARED / "LFM2-350M"
LFM25_TOKENIZER = SHARED / "LFM2.5-1.2B-Base"
GREEDY = dict(temperature=0.0, repetition_penalty=1.0)  # sampling settings for exact comparisons
EOS = 7  # TINY_CONFIG's end-of-sequence token (the real tokenizers' <|im_end|>)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# A small LFM2 with the real vocabulary, so the real tokenizer drives it.
TINY_CONFIG = dict(
    model_type="lfm2",
    vocab_size=65536,
    hidden_size=128,
    block_dim=128,  # transformers ignores it; mlx-lm's ModelArgs requires it, and real configs carry it
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=4,
    block_ff_dim=192,
    full_attn_idxs=[1, 3],
    max_position_embeddings=128_000,
    eos_token_id=7,
    bos_token_id=1,
    pad_token_id=0,
)


def relative_error(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|, for MLX or NumPy arrays."""
    ours, theirs = (np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x, dtype=np.float64)
                    for x in (ours, theirs))
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def require_shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the real LFM2 reference files live beside the project in ../shared")
    return SHARED


def write_checkpoint(path: Path, config: dict, seed: int = 0, tokenizer_from: Path | None = None,
                     dtype: str = "float32") -> Path:
    """Random weights through ``transformers.Lfm2ForCausalLM.save_pretrained``: the real on-disk format."""
    import torch
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(seed)
    model = Lfm2ForCausalLM(Lfm2Config(**config)).to(getattr(torch, dtype)).eval()
    model.save_pretrained(path)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy(tokenizer_from / name, path / name)
    return path


def real_350m_config() -> dict:
    return json.loads((require_shared() / "LFM2-350M" / "config.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Tiny random LFM2 with the real LFM2 tokenizer files (when ../shared is there)."""
    tok = LFM2_350M if LFM2_350M.is_dir() else None
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_CONFIG, tokenizer_from=tok)


@pytest.fixture(scope="session")
def checkpoint_350m(tmp_path_factory) -> Path:
    """Random weights in the exact LFM2-350M shape, float32, with its real tokenizer."""
    config = real_350m_config()
    return write_checkpoint(tmp_path_factory.mktemp("lfm2-350m"), config, tokenizer_from=LFM2_350M)


@pytest.fixture(scope="session")
def torch_model_350m(checkpoint_350m):
    from transformers import Lfm2ForCausalLM

    return Lfm2ForCausalLM.from_pretrained(checkpoint_350m, dtype="float32").eval()


@pytest.fixture(scope="session")
def torch_model_tiny(tiny_checkpoint):
    from transformers import Lfm2ForCausalLM

    return Lfm2ForCausalLM.from_pretrained(tiny_checkpoint, dtype="float32").eval()


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """(model, tokenizer) of the tiny checkpoint in float32; needs the real tokenizer from ../shared."""
    require_shared()
    import lfm_mlx

    return lfm_mlx.load(tiny_checkpoint, dtype="float32")


def forcing(token_ids):
    """A logits processor that makes the model emit ``token_ids`` in order: scripted output through
    the real engine, for testing text handling independently of what random weights would say."""
    import mlx.core as mx

    state = {"start": None}

    def processor(history, logits):
        if state["start"] is None:
            state["start"] = history.size
        i = history.size - state["start"]
        target = token_ids[i] if i < len(token_ids) else 7
        return mx.where(mx.arange(logits.shape[-1]) == target, 0.0, -mx.inf)[None].astype(logits.dtype)

    return processor


def ban(*token_ids):
    """A logits processor that forbids the given tokens (e.g. EOS, to force long generations)."""
    import mlx.core as mx

    def processor(history, logits):
        mask = mx.zeros((logits.shape[-1],), dtype=mx.bool_)
        for t in token_ids:
            mask = mask | (mx.arange(logits.shape[-1]) == t)
        return mx.where(mask, -mx.inf, logits)

    return processor


@pytest.fixture
def poisoned_checkpoint(tiny_checkpoint, tmp_path):
    """A factory: a copy of the tiny checkpoint with one value of one tensor replaced (NaN by default)."""
    import mlx.core as mx

    def make(tensor: str = "model.layers.1.self_attn.q_proj.weight", value: float = float("nan")) -> Path:
        path = shutil.copytree(tiny_checkpoint, tmp_path / "poisoned")
        weights = mx.load(str(path / "model.safetensors"))
        flat = weights[tensor].flatten()
        flat[7] = value
        weights[tensor] = flat.reshape(weights[tensor].shape)
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
        return path

    return make


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has exited and been reaped, as a killed conversion's PID would be."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def tiny_4bit(tiny_checkpoint):
    """The tiny checkpoint quantized to 4 bits in memory (float32 scales, as loaded on the CPU)."""
    import mlx.nn as nn

    import lfm_mlx

    model = lfm_mlx.load_model(tiny_checkpoint, dtype="float32")
    nn.quantize(model, group_size=64, bits=4)
    lfm_mlx.quantized.accelerate(model)
    mx.eval(model.parameters())
    return model
