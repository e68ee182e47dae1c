"""Which model runs: a local directory, the converted cache, a download converted once, or the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm_mlx import demo, resolve


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory) -> Path:
    return demo.build_demo(tmp_path_factory.mktemp("demo"))


def test_default_model_falls_back_to_demo_when_hub_unreachable(tmp_path, monkeypatch):
    import lfm_mlx.loading

    def offline(*_args, **_kwargs):
        raise ConnectionError("could not reach the Hugging Face hub")

    monkeypatch.setenv("LFM_MLX_CACHE", str(tmp_path))
    monkeypatch.setattr(lfm_mlx.loading, "get_model_path", offline)
    messages = []
    choice = resolve.resolve_model(None, log=messages.append)
    assert choice.demo and choice.path == demo.demo_dir() and "could not be downloaded" in choice.note
    assert any("demo model" in m for m in messages)
    with pytest.raises(ConnectionError):  # a model asked for by name is not silently replaced
        resolve.resolve_model("LiquidAI/LFM2.5-1.2B-Instruct", log=messages.append)


def test_resolve_model_prefers_local_dirs_and_the_converted_cache(tmp_path, monkeypatch, demo_path):
    monkeypatch.setenv("LFM_MLX_CACHE", str(tmp_path))
    local = resolve.resolve_model(str(demo_path))
    assert local.path == demo_path and local.demo  # a demo checkpoint is recognised wherever it is
    cached = resolve.converted_dir("LiquidAI/LFM2.5-350M")
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    choice = resolve.resolve_model(None)
    assert choice.path == cached and not choice.demo and choice.name == resolve.DEFAULT_MODEL
    assert resolve.resolve_model("anything", demo=True).demo


def test_hub_model_is_converted_to_4bit_once_then_loaded_from_the_cache(tmp_path, monkeypatch, tiny_checkpoint):
    import lfm_mlx.loading

    calls = []

    def fake_hub(name, revision=None):
        calls.append(name)
        return tiny_checkpoint

    monkeypatch.setenv("LFM_MLX_CACHE", str(tmp_path))
    monkeypatch.setattr(lfm_mlx.loading, "get_model_path", fake_hub)
    messages = []
    first = resolve.resolve_model("Org/Tiny", log=messages.append)
    assert first.path == tmp_path / "Org" / "Tiny-4bit" and not first.demo
    assert json.loads((first.path / "config.json").read_text())["quantization"]["bits"] == 4
    assert any("Converting Org/Tiny" in m for m in messages) and any("bits/weight" in m for m in messages)
    again = resolve.resolve_model("Org/Tiny")
    assert again.path == first.path and calls.count("Org/Tiny") == 1  # no second download or conversion
    model = lfm_mlx.load_model(again.path)
    assert model.args.quantization["bits"] == 4
