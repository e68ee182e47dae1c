"""Loading checkpoints: layouts, dtypes, and bad input that must fail with errors naming the fix."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import lfm_mlx
from lfm_mlx.config import ConfigError
from lfm_mlx.loading import CheckpointError, get_model_path


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_like_single_file(tiny_checkpoint, tmp_path):
    from transformers import Lfm2ForCausalLM

    sharded = tmp_path / "sharded"
    Lfm2ForCausalLM.from_pretrained(tiny_checkpoint).save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ids = mx.array([[1, 2, 3, 4, 5]])
    a = lfm_mlx.load_model(tiny_checkpoint)(ids)
    b = lfm_mlx.load_model(sharded)(ids)
    assert np.array_equal(np.array(a), np.array(b))


def test_default_dtype_is_float32_on_cpu(tiny_checkpoint):
    model = lfm_mlx.load_model(tiny_checkpoint)
    expected = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert model.model.layers[0].feed_forward.w1.weight.dtype == expected


def test_load_returns_model_and_tokenizer_with_streaming_detokenizer(tiny_checkpoint):
    model, tokenizer = lfm_mlx.load(str(tiny_checkpoint))
    if not (tiny_checkpoint / "tokenizer.json").is_file():
        pytest.skip("../shared absent: the tiny checkpoint has no tokenizer")
    ids = tokenizer.encode("Hello, MLX!")
    detok = tokenizer.detokenizer
    detok.reset()
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == tokenizer.decode(ids)
    assert 7 in tokenizer.eos_token_ids
    assert model(mx.array([ids])).shape == (1, len(ids), 65536)


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        lfm_mlx.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        lfm_mlx.load(str(tmp_path / "nope"))


def test_missing_config_says_what_a_model_directory_holds(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in .*config.json"):
        lfm_mlx.load_model(tmp_path)


def test_invalid_config_json_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        lfm_mlx.load_model(tmp_path)


def test_unknown_model_type_is_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        lfm_mlx.load_model(path)


def test_missing_weights_are_reported(tiny_checkpoint, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", path)
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights"):
        lfm_mlx.load_model(path)


def test_wrong_shaped_tensor_names_tensor_and_config_key(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 1000  # → 768 wide, the weights are 256
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"feed_forward\.w1\.weight has shape .* check intermediate_size"):
        lfm_mlx.load_model(path)


def test_layer_pattern_disagreeing_with_weights_is_reported(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["layer_types"] = ["conv"] * config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layer_types"):
        lfm_mlx.load_model(path)


def test_truncated_safetensors_is_reported_as_corrupt(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        lfm_mlx.load_model(path)


def test_unknown_dtype_lists_the_choices(tiny_checkpoint):
    with pytest.raises(ValueError, match="unsupported dtype 'float8'.*float32"):
        lfm_mlx.load_model(tiny_checkpoint, dtype="float8")


def test_hub_id_offline_says_hub_unreachable_and_how_to_use_a_local_path(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="could not reach the Hugging Face hub.*local model directory"):
        get_model_path("LiquidAI/LFM2.5-350M")


def test_load_warns_naming_a_tensor_with_nan(poisoned_checkpoint):
    path = poisoned_checkpoint()
    with pytest.warns(RuntimeWarning, match=r"tensor model\.layers\.1\.self_attn\.q_proj\.weight of .* holds NaN"):
        model = lfm_mlx.load_model(path)
    assert mx.isnan(model(mx.array([[1, 2, 3]]))).any().item()


def test_finite_weights_load_without_warnings(tiny_checkpoint):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lfm_mlx.load_model(tiny_checkpoint)


def test_load_restores_a_model_left_missing_by_an_interrupted_overwrite(tiny_checkpoint, tmp_path, dead_pid):
    """A --force conversion killed between its two renames, its new copy since removed: the old one is aside."""
    shutil.copytree(tiny_checkpoint, tmp_path / f".model.old-{dead_pid}-0123abcd")
    with pytest.warns(UserWarning, match="model was missing after an interrupted --force overwrite: restored"):
        model, _ = lfm_mlx.load(str(tmp_path / "model"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 65536)
