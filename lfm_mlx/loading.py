"""Find, read and check checkpoints: local directories or Hugging Face hub ids, float or MLX-quantized."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelArgs, load_config
from .model import Model
from .quantized import accelerate

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]
# The converter's hidden folders beside its destination DST: ``.DST.tmp-PID-XXXXXXXX`` (the new copy,
# renamed into place once complete) and ``.DST.old-PID-XXXXXXXX`` (the copy a --force overwrite moves aside
# just before). The PID tells a killed writer's leftovers from a running conversion's.
_WRITE_FOLDER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<token>(?P<pid>[1-9][0-9]{0,8})-[0-9a-f]{8})")


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


def write_token() -> str:
    """One conversion's tag for its hidden folders: its PID and a random suffix."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_folder(dst: Path, kind: str, token: str) -> Path:
    """``.DST.tmp-TOKEN`` (kind ``tmp``) or ``.DST.old-TOKEN`` (kind ``old``), beside ``dst``."""
    return dst.with_name(f".{dst.name}.{kind}-{token}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and is another user's
        pass
    return True


def recover_interrupted_write(dst: Path) -> None:
    """Repair what a killed conversion left beside ``dst``. A ``--force`` overwrite stopped between its two
    renames (``dst`` missing, the old copy in ``.DST.old-*``) is completed with the new copy, or rolled
    back to the old one if the new is gone; other folders of dead writers are removed. Folders of a live
    conversion are left alone. Each repair is reported in one warning line."""
    if not dst.parent.is_dir():
        return
    dead = {}
    for path in dst.parent.iterdir():
        m = _WRITE_FOLDER.fullmatch(path.name)
        if m and m["name"] == dst.name and not _alive(int(m["pid"])):
            dead[m["kind"], m["token"]] = path
    interrupted = next((token for kind, token in sorted(dead) if kind == "old"), None)
    if interrupted is not None and not dst.exists():
        # The old copy is moved aside only once the new one is complete, so a new copy here is whole.
        new = dead.pop(("tmp", interrupted), None)
        if new is not None:
            new.rename(dst)
            warnings.warn(f"{dst} was missing after an interrupted --force overwrite: moved the new, complete "
                          f"copy into place from {new.name}", stacklevel=3)
        else:
            old = dead.pop(("old", interrupted))
            old.rename(dst)
            warnings.warn(f"{dst} was missing after an interrupted --force overwrite: restored the previous "
                          f"copy from {old.name}", stacklevel=3)
    for path in dead.values():
        shutil.rmtree(path, ignore_errors=True)
    if dead:
        warnings.warn(f"removed {len(dead)} temporary folder(s) beside {dst} left by interrupted conversions "
                      f"({', '.join(sorted(p.name for p in dead.values()))})", stacklevel=3)


def get_model_path(path_or_hub_id: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory as is; anything shaped like ``owner/name`` that is not one is fetched from
    the hub (cached by huggingface_hub, with its progress bars)."""
    path = Path(path_or_hub_id).expanduser()
    if not path.exists():
        recover_interrupted_write(path)
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


def nonfinite_tensors(weights: dict[str, mx.array]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf. Each tensor is dropped from ``weights`` once
    checked, so lazily loaded weights are read one at a time and never all in memory."""
    bad = []
    for name in list(weights):
        w = weights.pop(name)
        # A sum is NaN or inf whenever a value is, and summing is ~6x faster than isfinite().all() on the
        # CPU; only a sum that overflows (float16) with finite values needs the exact second look.
        if mx.issubdtype(w.dtype, mx.floating) and not math.isfinite(w.sum().item()):
            if not mx.isfinite(w).all().item():
                bad.append(name)
    return bad


def describe_tensors(names: list[str]) -> str:
    return f"tensor {names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


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
    """Build the model from a local directory and load its weights, checked against the config. Unless
    ``lazy``, warns naming any tensor with NaN or inf values (the check costs one pass over the weights)."""
    model_path = Path(path).expanduser()
    if not model_path.exists():
        recover_interrupted_write(model_path)
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
    if not lazy:
        mx.eval(model.parameters())
        bad = nonfinite_tensors(dict(tree_flatten(model.parameters())))
        if bad:
            warnings.warn(f"{describe_tensors(bad)} of {model_path} holds NaN or inf values: outputs that use it "
                          "will be NaN; download or convert the checkpoint again", RuntimeWarning, stacklevel=2)
    model.eval()
    return accelerate(model)


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

