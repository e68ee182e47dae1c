"""The demo model: built offline, byte-for-byte the same every time, loadable."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

import lfm_mlx
from lfm_mlx import demo


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory) -> Path:
    return demo.build_demo(tmp_path_factory.mktemp("demo"))


def test_demo_checkpoint_is_byte_identical_when_built_twice(demo_path, tmp_path):
    again = demo.build_demo(tmp_path / "again")
    files = sorted(p.name for p in demo_path.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "special_tokens_map.json"} <= set(files)
    for name in files:
        assert (demo_path / name).read_bytes() == (again / name).read_bytes(), name


def test_demo_loads_and_gives_the_same_logits_every_time(demo_path):
    prompt = mx.array([[1, 6, 100, 200, 300, 7]])
    logits = []
    for _ in range(2):
        model, tokenizer = lfm_mlx.load(demo_path)
        logits.append(model(prompt))
    assert logits[0].shape == (1, 6, model.args.vocab_size)
    assert mx.array_equal(logits[0], logits[1]).item()
    assert model.args.attention_layers == [2, 5] and len(model.args.layer_types) == 6
    assert float(mx.std(logits[0][0, -1])) > 1.0  # not a degenerate, flat distribution


def test_demo_tokenizer_has_lfm2_special_tokens_and_chatml_template(demo_path):
    _, tokenizer = lfm_mlx.load(demo_path)
    for i, token in enumerate(demo.SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == i
    assert tokenizer.eos_token_ids == {7}
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "tool", "content": "42"}],
        tools=[{"name": "f"}], add_generation_prompt=True, tokenize=False)
    assert text == ('<|startoftext|><|im_start|>system\nBe brief.\nList of tools: <|tool_list_start|>[{"name": "f"}]'
                    "<|tool_list_end|><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
                    "<|im_end|>\n<|im_start|>tool\n<|tool_response_start|>42<|tool_response_end|><|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer.encode("Invoice total: 65.56 EUR, café")  # any text round-trips, bytes included
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Invoice total: 65.56 EUR, café"


def test_demo_writes_printable_text_and_never_ends_early(demo_path):
    model, tokenizer = lfm_mlx.load(demo_path)
    responses = list(lfm_mlx.stream_generate(model, tokenizer, [{"role": "user", "content": "Hello"}],
                                             max_tokens=200, seed=0))
    text = "".join(r.text for r in responses)
    assert len(responses) == 200 and responses[-1].finish_reason == "length"
    assert text.isascii() and "<|" not in text and "\ufffd" not in text


def test_demo_extraction_is_valid_and_short(demo_path):
    from lfm_mlx.extract import extract

    model, tokenizer = lfm_mlx.load(demo_path)
    schemas = Path(__file__).resolve().parents[1] / "assets" / "schemas"
    schema = json.loads((schemas / "invoice.json").read_text())
    result = extract(model, tokenizer, (schemas / "invoice.txt").read_text(), schema)
    assert result.valid
    assert result.stats.generation_tokens < 200  # the biases close values at once, not at the budget


def test_ensure_demo_builds_once_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_MLX_CACHE", str(tmp_path))
    path = demo.ensure_demo()
    assert path == tmp_path / f"demo-{demo.DEMO_VERSION}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left behind
    assert demo.is_demo(path)
