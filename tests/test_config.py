"""config.json → ModelArgs: the real LFM2 / LFM2.5 configs as transformers reads them, and nonsense refused
in one error naming the key and what it may be."""

from __future__ import annotations

import json

import pytest

import lfm_mlx
from lfm_mlx.config import ConfigError, ModelArgs


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
