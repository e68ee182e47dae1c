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
    assert "llama.cpp's server skipped: --model is an MLX checkpoint" in printed
    assert json.loads(out.read_text())["servers"] == json.loads(json.dumps(report["servers"]))


def test_serve_table_compares_each_peer_and_how_each_server_grows_from_one_client_to_16():
    from lfm_mlx.bench_serve import table

    def level(tok_s, itl_p95):
        return {"output_tok_s": tok_s, "requests_s": 0.5, "requests_done": 3, "ttft_p50_s": 0.2, "ttft_p95_s": 0.4,
                "itl_p50_s": 0.02, "itl_p95_s": itl_p95, "errors": 0, "peak_rss_mb": 900.0}

    report = {"seconds": 40, "servers": {"chat": {
        1: {"lfm_mlx": level(30.0, 0.025), "mlx_lm": level(0.0, None), "llama_cpp": level(25.0, 0.030)},
        16: {"lfm_mlx": level(75.0, 0.200), "mlx_lm": level(0.0, None), "llama_cpp": level(30.0, 0.210)}}}}
    printed = table(report)
    assert "engine vs engine" not in printed  # not measured: no section
    assert "1.20x lfm_mlx / llama_cpp" in printed and "2.50x lfm_mlx / llama_cpp" in printed
    assert "lfm_mlx / mlx_lm" not in printed  # nothing streamed: no ratio
    assert "from 1 client to 16: lfm_mlx tok/s 2.50x, ITL p95 8.0x; llama_cpp tok/s 1.20x, ITL p95 7.0x" in printed


def test_serve_benchmark_refuses_an_unknown_server_before_any_work(capsys):
    with pytest.raises(SystemExit) as failure:
        bench.main(["serve", "--servers", "lfm_mlx,vllm", "--model", "/nonexistent"])
    assert failure.value.code == 2
    assert "unknown --servers vllm: choose from lfm_mlx, mlx_lm, llama_cpp" in capsys.readouterr().err


def test_cpu_benchmark_measures_both_mlx_libraries_quiet_and_busy(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    report = bench.main(["cpu", "--tiny", "--budget", "2", "--agreement-tokens", "8", "--json", str(out),
                         "--cache-dir", str(tmp_path / "cache")])
    for lib in ("lfm_mlx", "mlx_lm"):
        column = report["columns"][lib]
        assert set(column) == {"prefill_32", "prefill_64", "decode_16", "decode_64", "prefill_busy_32",
                               "decode_busy_16"}
        assert all(v > 0 for v in column.values()), column
    assert report["machine"]["memory_GBps"] > 0
    assert report["profile"]["products"] > 0 and report["profile"]["step_ms"] > 0
    assert report["int8"]["positions"] == 8 and 0 <= report["int8"]["greedy_agreement"] <= 1
    printed = capsys.readouterr().out
    assert "lfm_mlx/mlx_lm" in printed and "beside one busy process" in printed and "per token" in printed
    assert json.loads(out.read_text())["columns"] == report["columns"]


def test_cpu_benchmark_reads_llama_bench_json(tmp_path):
    """llama.cpp's column comes from llama-bench's JSON (a stand-in binary here: building llama.cpp
    takes minutes, and the benchmark itself runs the real one)."""
    from lfm_mlx import bench_cpu

    rows = [{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 400.0},
            {"n_prompt": 0, "n_gen": 32, "n_depth": 128, "avg_ts": 50.0},
            {"n_prompt": 0, "n_gen": 32, "n_depth": 8192, "avg_ts": 40.0}]
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho " + "'" + json.dumps(rows) + "'\n")
    fake.chmod(0o755)
    results = bench_cpu.llama_bench(tmp_path, tmp_path / "w.gguf", 2, (512,), (128, 8192))
    assert results == {("prefill", 512): 400.0, ("decode", 128): 50.0, ("decode", 8192): 40.0}
    fake.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    with pytest.raises(OSError, match="llama-bench failed \\(3\\): boom"):
        bench_cpu.llama_bench(tmp_path, tmp_path / "w.gguf", 2, (512,), ())
