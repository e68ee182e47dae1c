"""Find, read and check checkpoints: local directories or Hugging Face hub ids, float or MLX-quantized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError, ModelArgs, load_config
from .model import Model
from .sample import read_generation_config

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]


class CheckpointError(ValueError):
    """Weights that cannot be read or do not fit the config; the message names the file or key."""


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (bf16 is ~10x slower there), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve_dtype(dtype: Union[str, mx.Dtype, None]) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, mx.Dtype):
        return dtype
    name = str(dtype).removeprefix("mlx.core.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def get_model_path(path_or_hub_id: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory as is; anything shaped like ``owner/name`` that is not one is fetched from
    the hub (cached by huggingface_hub, with its progress bars)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file: pass the model directory that holds config.json")
        return path
    text = str(path_or_hub_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such model directory: {text}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{text} is neither a local directory nor a model on the Hugging Face hub"
        ) from None
    except LocalEntryNotFoundError:
        raise ConnectionError(
            f"could not reach the Hugging Face hub to download {text}, and it is not in the local "
            "cache: connect to the internet once, or pass a local model directory instead"
        ) from None
    except HfHubHTTPError as e:
        raise ConnectionError(f"downloading {text} from the Hugging Face hub failed: {e}") from None


def weight_files(model_path: Path) -> list[Path]:
    """``model.safetensors``, or the shards listed by ``model.safetensors.index.json``."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = [model_path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards missing from {model_path}: {missing}")
        return files
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    return files


def load_weights(model_path: Path) -> dict[str, mx.array]:
    weights = {}
    for f in weight_files(model_path):
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(
                f"{f} is not a readable safetensors file ({e}): it may be truncated or corrupt; "
                "download or convert it again"
            ) from None
    return weights


# Which config keys decide the shape of a parameter, for errors that say what to fix.
_SHAPE_KEYS = {
    "embed_tokens": "vocab_size / hidden_size",
    "lm_head": "vocab_size / hidden_size / tie_word_embeddings",
    "feed_forward": "intermediate_size (block_ff_dim) / block_auto_adjust_ff_dim / block_multiple_of / block_ffn_dim_multiplier",
    "self_attn": "num_attention_heads / num_key_value_heads / head_dim / hidden_size",
    "conv.conv": "conv_L_cache / hidden_size",
    "conv": "hidden_size / conv_bias",
    "norm": "hidden_size / head_dim",
}


def _config_keys_for(name: str) -> str:
    return next((keys for part, keys in _SHAPE_KEYS.items() if part in name), "hidden_size")


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Every parameter present with the shape the config implies, and nothing unexpected."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))
    for name, param in expected.items():
        if name not in weights:
            layer_hint = " (check layer_types / full_attn_idxs)" if ".layers." in name else ""
            raise CheckpointError(f"checkpoint has no tensor {name}{layer_hint}")
        if tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {name} has shape {tuple(weights[name].shape)} in the checkpoint but the "
                f"config implies {tuple(param.shape)}: check {_config_keys_for(name)} in config.json"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"checkpoint has tensors the config does not describe, e.g. {unexpected[0]} "
            "(check layer_types / full_attn_idxs / conv_bias / tie_word_embeddings)"
        )


def quantize_like_checkpoint(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Swap in quantized layers where the checkpoint has ``scales``: mlx-lm's layout, including its
    per-layer overrides (``{"model.layers.0.x": {"bits": 8, "group_size": 64}}`` or ``false``)."""

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_model(
    path: Union[str, Path], dtype: Union[str, mx.Dtype, None] = None, lazy: bool = False
) -> Model:
    """Build the model from a local directory and load its weights, checked against the config."""
    model_path = Path(path).expanduser()
    if not model_path.is_dir():
        raise FileNotFoundError(f"no such model directory: {path}")
    config = load_config(model_path)
    args = ModelArgs.from_dict(config)
    model = Model(args)
    weights = model.sanitize(load_weights(model_path))
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization and "bits" in quantization:
        quantize_like_checkpoint(model, quantization, weights)
    check_weights(model, weights)

    dtype = resolve_dtype(dtype)
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    model.sampling_defaults = read_generation_config(model_path)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(
    path_or_hub_id: Union[str, Path],
    dtype: Union[str, mx.Dtype, None] = None,
    revision: Optional[str] = None,
):
    """``(model, tokenizer)`` from a local directory or a hub id, as ``mlx_lm.load`` does."""
    from .tokenizer import load_tokenizer

    model_path = get_model_path(path_or_hub_id, revision)
    model = load_model(model_path, dtype)
    tokenizer = load_tokenizer(model_path, eos_token_ids=model.args.eos_token_id)
    return model, tokenizer

