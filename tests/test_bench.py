"""The benchmark program runs end to end (a tiny smoke run; the real numbers come from running it)."""

from __future__ import annotations

import json

import pytest

from lfm_mlx import bench


def test_tiny_benchmark_writes_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--bits", "4", "--json", str(out), "--cache-dir", str(tmp_path / "cache")])
    report = json.loads(out.read_text())
    results = report["results"]
    expected = {"prefill_tok_s_P32", "prefill_tok_s_P64", "decode_tok_s_ctx16", "decode_tok_s_ctx64",
                "peak_memory_mb", "memory_mb_ctx256_kvfloat", "memory_mb_ctx256_kv8",
                "batch_decode_tok_s_B1", "batch_decode_tok_s_B4"}
    assert expected <= set(results)
    for key in expected:
        for lib in ("lfm_mlx", "mlx_lm"):
            assert results[key][lib]["value"] > 0, (key, lib)
        assert results[key]["ratio"] > 0
    assert report["config"]["compute_dtype"] == {"lfm_mlx": "mlx.core.float32", "mlx_lm": "mlx.core.float32"}
    for workload in ("document", "copy"):
        spec = report["speculative"][workload]
        assert spec["identical"] and spec["plain_tok_s"] > 0 and spec["prompt_lookup_tok_s"] > 0
        assert 0 <= spec["acceptance"] <= 1
    assert report["speculative"]["copy"]["acceptance"] > 0.5  # the reply is in the prompt


def test_a_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as failure:
        bench.main(["--model", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)])
    assert "missing" in str(failure.value) and "error" in str(failure.value)


def test_serve_benchmark_runs_both_servers_and_prints_every_section(tiny_checkpoint, tmp_path, capsys):
    from conftest import require_shared

    require_shared()
    out = tmp_path / "serve.json"
    report = bench.main(["serve", "--model", str(tiny_checkpoint), "--concurrency", "1,2", "--seconds", "3",
                         "--engine-batches", "1,2", "--json", str(out)])
    assert report["single"]["engine"] > 0 and report["single"]["plain"] > 0
    assert all(row["lfm_mlx"] > 0 and row["mlx_lm"] > 0 for row in report["engine"].values())
    levels = [level for mix in ("chat", "extract") for level in report["servers"][mix].values()]
    assert len(levels) == 4 and all(set(level) == {"lfm_mlx", "mlx_lm"} for level in levels)
    assert all(level["lfm_mlx"]["errors"] == 0 for level in levels)
    # Served tokens, over all levels: one 3 s level alone may be all prefill on a busy machine.
    assert sum(level["lfm_mlx"]["output_tok_s"] for level in levels) > 0
    printed = capsys.readouterr().out
    assert "one stream:" in printed and "server vs server, extract mix" in printed
    assert json.loads(out.read_text())["servers"] == json.loads(json.dumps(report["servers"]))
