"""Loading checkpoints: layouts, dtypes, and bad input that must fail with errors naming the fix."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import lfm_mlx
from lfm_mlx.config import ConfigError, ModelArgs
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


def test_real_configs_parse_with_transformers_semantics():
    from conftest import require_shared
    from transformers import Lfm2Config

    shared = require_shared()
    paths = [shared / "LFM2-350M" / "config.json", shared / "LFM2.5-1.2B-Base" / "config.json",
             *sorted((shared / "LFM2.5-350M-family-configs").glob("*.json"))]
    for path in paths:
        raw = json.loads(path.read_text())
        args, ref = ModelArgs.from_dict(raw), Lfm2Config(**raw)
        assert args.layer_types == ref.layer_types, path.name
        assert args.intermediate_size == ref.intermediate_size, path.name
        assert args.tie_word_embeddings == ref.tie_word_embeddings, path.name
        assert args.rope_theta == ref.rope_parameters["rope_theta"], path.name
    args = ModelArgs.from_dict(json.loads(paths[0].read_text()))
    assert (args.ff_dim, args.head_dim, len(args.attention_layers)) == (4608, 64, 6)


BAD_CONFIGS = [
    # (config.json text or a change to the tiny config, expected error)
    ("[1, 2]", r"config\.json holds an array, not an object: .*\{\"model_type\": \"lfm2\", \.\.\.\}"),
    ('"lfm2"', "holds a string, not an object"),
    (dict(num_attention_heads=0), "num_attention_heads is 0 in config.json: use an integer from 1 to 1,024"),
    (dict(vocab_size=1e12), r"vocab_size is 1000000000000\.0 in config.json: use an integer from 1 to 16,777,216"),
    (dict(vocab_size=10**12), "vocab_size is 1000000000000 in config.json: use an integer from 1 to 16,777,216"),
    (dict(hidden_size=-128), "hidden_size is -128 in config.json: use an integer from 1 to"),
    (dict(hidden_size=130), r"hidden_size \(130\) must be a multiple of num_attention_heads \(4\) .* or set head_dim"),
    (dict(num_hidden_layers=10**9), "num_hidden_layers is 1000000000 in config.json: use an integer from 1 to 1,024"),
    (dict(num_key_value_heads=True), "num_key_value_heads is True in config.json: use an integer"),
    (dict(block_ff_dim=192.5), "block_ff_dim is 192.5 in config.json: use an integer"),
    (dict(norm_eps="small"), "norm_eps is 'small' in config.json: use a positive number"),
    (dict(conv_bias="false"), "conv_bias is 'false' in config.json: use true or false"),
    (dict(full_attn_idxs=[1, 9]), r"full_attn_idxs is \[1, 9\] in config.json: use a list of layer indices, 0 to 3"),
    (dict(layer_types=["conv", "attention", "conv", "conv"]), r"layer_types\[1\] is 'attention' .* 'full_attention'"),
    (dict(eos_token_id="</s>"), "eos_token_id is '</s>' in config.json: use a token id"),
    (dict(quantization=4), r"quantization is 4 in config.json: use an object \(\{\.\.\.\}\) or null"),
    (dict(block_ffn_dim_multiplier=1e9), "feed-forward width of .* use values that give 1 to 16,777,216"),
]


def write_config(path, config) -> None:
    from conftest import TINY_CONFIG

    path.mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps({**TINY_CONFIG, **config})
    (path / "config.json").write_text(text)


@pytest.mark.parametrize("config,message", BAD_CONFIGS, ids=[str(c) for c, _ in BAD_CONFIGS])
def test_nonsense_config_is_one_error_naming_the_key_and_the_allowed_values(tmp_path, config, message):
    write_config(tmp_path, config)  # no weights needed: the config is checked before any is read
    with pytest.raises(ConfigError, match=message):
        lfm_mlx.load(str(tmp_path))


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
