"""Serving under concurrency, against mlx-lm and llama.cpp, in one run: ``python -m lfm_mlx.bench serve``.

    python -m lfm_mlx.bench serve [--model PATH] [--concurrency 1,4,16,64] [--seconds 60]
                                  [--mixes chat,extract] [--servers lfm_mlx,mlx_lm,llama_cpp] [--json out.json]

0. One stream: ``stream_generate`` through the engine against the plain one-sequence decode loop that
   ``stream_generate`` was before the engine (prefill, then ``decode_tokens`` with greedy argmax and
   detokenization), alternating, on the same weights: the engine must cost a single stream nothing.
1. Engine against engine, in one process, on the same weights and dtype (float32): lfm_mlx's
   ``Engine`` and mlx-lm's ``BatchGenerator`` decode B greedy rows; tokens per second once every row
   is decoding.
2. Server against server, each at its defaults: ``python -m lfm_mlx.server`` and ``mlx_lm.server``
   on the same 4-bit weights, and llama.cpp's ``llama-server`` (the CPU reference; built as for
   ``bench cpu``, with 16 slots of 2,048 tokens, since its default 4 would queue at C = 16) on the
   same weights as Q4_0 (without ``--model`` only: it cannot load an MLX checkpoint). C clients
   stream chat completions in a closed loop (each sends its next request as soon as one ends, so new
   requests keep joining running ones), with mixed prompt lengths, for a chat mix and an extraction
   mix (``response_format`` json_schema: lfm_mlx enforces it, mlx-lm ignores it, llama.cpp compiles
   it to a grammar). Each level runs ``--seconds``; requests still running at the end are cut and
   their streamed tokens counted. Reported: aggregate output tok/s, requests/s, time to first
   token and inter-token latency (p50/p95), the server's peak resident memory, and how each server's
   throughput and inter-token p95 grow from one client to 16.

Without ``--model`` it uses the benchmark's random weights in the LFM2-350M shape, 4-bit (mlx-lm's
quantizer), with LFM2-350M's tokenizer and chat template from ``../shared/lfm2-reference``.
This is a program that prints a table, not a test: the machine's noise is part of each number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "lfm2-reference" / "LFM2-350M"
SCHEMA = ROOT / "assets" / "schemas" / "invoice.json"
WORDS = ("the invoice total amount date customer order shipped paid quantity price item name address city "
         "street number contact email phone account balance due report meeting project note summary").split()


# --- weights --------------------------------------------------------------------------------------

def weights(args) -> Path:
    """The directory both servers load: ``--model``, or random 350M-shape 4-bit weights + a tokenizer."""
    if args.model:
        return Path(args.model)
    from .bench import LFM2_350M, quantized_checkpoint, random_checkpoint

    if not (TOKENIZER / "tokenizer.json").is_file():
        raise OSError(f"no tokenizer at {TOKENIZER}: pass --model with a checkpoint that has one")
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = quantized_checkpoint(random_checkpoint(cache / "lfm2-350m-bf16", LFM2_350M), 4, 64, cache)
    with_tokenizer(path)
    return path


def with_tokenizer(directory: Path) -> None:
    """LFM2-350M's tokenizer and chat template beside random weights (files already there are kept)."""
    for f in TOKENIZER.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) and not (directory / f.name).exists():
            shutil.copy(f, directory / f.name)


def llama_cpp(args) -> tuple[Path, Path]:
    """llama.cpp's ``llama-server`` and the benchmark's random weights as its Q4_0 GGUF."""
    if args.model:
        raise OSError("--model is an MLX checkpoint, which llama.cpp cannot load")
    from .bench import LFM2_350M, random_checkpoint
    from .bench_cpu import build_llama_cpp, q4_0_weights

    cache = Path(args.cache_dir)
    source = random_checkpoint(cache / "lfm2-350m-bf16", LFM2_350M)
    with_tokenizer(source)  # its converter needs the tokenizer, its server the chat template
    bin_dir = build_llama_cpp(cache, ("llama-server", "llama-quantize"))
    return bin_dir / "llama-server", q4_0_weights(bin_dir, source, cache)


# --- 0. one stream ----------------------------------------------------------------------------------

def single_stream(path: Path, tokens: int = 64, rounds: int = 3) -> dict:
    """Decode tok/s of one greedy stream: the engine's ``stream_generate`` vs the plain loop."""
    from .bench import _greedy_step
    from .cache import PromptCache
    from .generate import decode_tokens, prefill, stream_generate
    from .loading import load

    model, tokenizer = load(path)
    prompt = list(range(1000, 1128))

    def plain() -> float:
        cache = PromptCache(model)
        prefill(model, cache, prompt[:-1])
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        times = []
        for token in decode_tokens(_greedy_step(model, cache.layers), prompt[-1], cache, tokens):
            detokenizer.add_token(token)
            times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])

    def engine() -> float:
        last = None
        for last in stream_generate(model, tokenizer, prompt, max_tokens=tokens, temperature=0.0,
                                    repetition_penalty=1.0):
            pass
        return last.generation_tps

    best = {"engine": 0.0, "plain": 0.0}
    for _ in range(rounds):
        best["plain"] = max(best["plain"], plain())
        best["engine"] = max(best["engine"], engine())
    best["ratio"] = best["engine"] / best["plain"] if best["plain"] else None
    print(f"  one stream: engine {best['engine']:.1f} vs plain loop {best['plain']:.1f} tok/s", flush=True)
    return best


# --- 1. engine against engine -----------------------------------------------------------------------

def engine_vs_engine(path: Path, batches: list[int], prompt_len: int = 16, tokens: int = 24,
                     rounds: int = 2) -> dict:
    from .bench import Ours, Theirs
    from .engine import Engine, Request
    from .sample import SamplingSettings
    from .tokenizer import load_tokenizer

    ours, theirs = Ours(path, "float32"), Theirs(path, "float32")
    tokenizer = load_tokenizer(path)
    greedy = SamplingSettings(temperature=0.0, repetition_penalty=1.0)
    rng = random.Random(0)

    def prompts(B):
        return [[rng.randrange(100, 60000) for _ in range(prompt_len)] for _ in range(B)]

    def run_ours(B: int) -> float:
        engine = Engine(ours.model, tokenizer, max_batch=B)
        counts = [0] * B
        for i, p in enumerate(prompts(B)):
            engine.submit(Request(p, max_tokens=tokens, sampling=greedy),
                          sink=lambda r, i=i: counts.__setitem__(i, counts[i] + (r is not None and not isinstance(r, BaseException))))
        return _decode_rate(engine.step, lambda: sum(counts), lambda: all(counts))

    def run_theirs(B: int) -> float:
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(theirs.model, max_tokens=tokens, completion_batch_size=B, prefill_batch_size=B,
                                   sampler=lambda x: __import__("mlx.core").core.argmax(x, axis=-1))
        generator.insert(prompts(B))
        seen: dict[int, int] = {}
        done: set[int] = set()

        def step() -> bool:
            if len(done) == B:
                return False
            for r in generator.next_generated():
                seen[r.uid] = seen.get(r.uid, 0) + 1
                if r.finish_reason is not None:
                    done.add(r.uid)
            return True

        rate = _decode_rate(step, lambda: sum(seen.values()), lambda: len(seen) == B)
        generator.close()
        return rate

    rows = {}
    for B in batches:
        best = {"lfm_mlx": 0.0, "mlx_lm": 0.0}
        for _ in range(rounds):
            best["lfm_mlx"] = max(best["lfm_mlx"], run_ours(B))
            best["mlx_lm"] = max(best["mlx_lm"], run_theirs(B))
        rows[B] = {**best, "ratio": best["lfm_mlx"] / best["mlx_lm"] if best["mlx_lm"] else None}
        print(f"  engine B={B}: lfm_mlx {best['lfm_mlx']:.1f} vs mlx_lm BatchGenerator {best['mlx_lm']:.1f} tok/s",
              flush=True)
    return rows


def _decode_rate(step, produced, all_started) -> float:
    """Tokens per second from the first step after which every row has a token, to the end."""
    while not all_started():
        if not step():
            return 0.0
    start, base = time.perf_counter(), produced()
    while step():
        pass
    elapsed = time.perf_counter() - start
    return (produced() - base) / elapsed if elapsed > 0 else 0.0


# --- 2. server against server -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(process: subprocess.Popen, url: str, log: Path, name: str, timeout: float) -> None:
    """Until ``url``/health answers 200; an error with the log's tail if the process exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not start in {timeout:.0f} s")


def process_memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A /proc/PID/status memory line (VmRSS: resident now, VmHWM: its peak) in MB; NaN without /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")  # no /proc (macOS): not measured


class ServerProcess:
    """A server on a loopback port, started and stopped by the benchmark."""

    def __init__(self, name: str, path: Path, llama: Optional[tuple] = None):
        self.name, self.port = name, free_port()
        if name == "lfm_mlx":
            command = [sys.executable, "-m", "lfm_mlx.server", "--model", str(path), "--port", str(self.port)]
        elif name == "llama_cpp":
            server, gguf = llama
            command = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
                       "-np", "16", "-c", str(16 * 2048)]
        else:
            command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port", str(self.port),
                       "--log-level", "WARNING"]
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        wait_healthy(self.process, self.url, Path(self.log.name), self.name, timeout)

    def peak_rss_mb(self) -> float:
        return process_memory_mb(self.process.pid, "VmHWM")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_body(mix: str, rng: random.Random, model: str) -> dict:
    """One request of the mix: chat with prompts of 16 to 1024 words, or extraction from a document."""
    if mix == "chat":
        words = rng.choice((16, 64, 256, 1024))
        return {"model": model, "messages": [{"role": "user", "content": _text(rng, words)}], "max_tokens": 64,
                "stream": True, "stream_options": {"include_usage": True}}
    schema = json.loads(SCHEMA.read_text())
    document = _text(rng, rng.choice((128, 256, 512)))
    return {"model": model, "max_tokens": 128, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": "Extract the invoice as JSON.\nSchema: " + json.dumps(schema)},
                         {"role": "user", "content": document}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}}}


async def _client(url: str, mix: str, seed: int, model: str, deadline: float, records: list) -> None:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=None) as http:
        while time.perf_counter() < deadline:
            record = {"start": time.perf_counter(), "chunks": [], "tokens": None, "done": False}
            records.append(record)
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=make_body(mix, rng, model)) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            record["done"] = True
                            break
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            record["tokens"] = event["usage"]["completion_tokens"]
                        if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                            record["chunks"].append(time.perf_counter())
            except httpx.HTTPError:
                record["error"] = True
                await asyncio.sleep(0.5)


async def _load(url: str, mix: str, clients: int, seconds: float, model: str) -> tuple[list, float]:
    records: list = []
    start = time.perf_counter()
    deadline = start + seconds
    tasks = [asyncio.create_task(_client(url, mix, i, model, deadline, records)) for i in range(clients)]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()  # requests still running are cut here: the client goes away
    await asyncio.gather(*tasks, return_exceptions=True)
    return records, time.perf_counter() - start


def _percentile(values: list, q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(records: list, elapsed: float) -> dict:
    done = [r for r in records if r["done"]]
    tokens = sum((r["tokens"] if r["done"] and r["tokens"] else len(r["chunks"])) for r in records)
    ttft = [r["chunks"][0] - r["start"] for r in records if r["chunks"]]
    gaps = [b - a for r in records for a, b in zip(r["chunks"], r["chunks"][1:])]
    return {"output_tok_s": tokens / elapsed, "requests_s": len(done) / elapsed, "requests_done": len(done),
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
            "itl_p50_s": _percentile(gaps, 0.5), "itl_p95_s": _percentile(gaps, 0.95),
            "errors": sum(1 for r in records if r.get("error"))}


def server_vs_server(path: Path, servers: list[str], mixes: list[str], levels: list[int], seconds: float,
                     llama: Optional[tuple] = None) -> dict:
    """Each (mix, level) on a freshly started server: requests a slow server could not finish at one
    level never run on into the next. ``llama``: llama-server's program and GGUF."""
    out: dict = {}
    for mix in mixes:
        for C in levels:
            for name in servers:
                server = ServerProcess(name, path, llama)
                try:
                    server.wait_ready()
                    # mlx_lm.server's /v1/models lists the Hugging Face cache; all take the path as the model
                    records, elapsed = asyncio.run(_load(server.url, mix, C, seconds, str(path)))
                    row = summarize(records, elapsed)
                    row["peak_rss_mb"] = server.peak_rss_mb()
                finally:
                    server.stop()
                out.setdefault(mix, {}).setdefault(C, {})[name] = row
                print(f"  {name} {mix} C={C}: {row['output_tok_s']:.1f} tok/s, {row['requests_done']} done, "
                      f"ttft p50 {_fmt(row['ttft_p50_s'])}, itl p95 {_fmt(row['itl_p95_s'])}, "
                      f"peak {row['peak_rss_mb']:.0f} MB", flush=True)
    return out


def _fmt(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def table(report: dict) -> str:
    lines = []
    if "single" in report:
        one = report["single"]
        lines += [f"one stream: stream_generate on the engine {one['engine']:.1f} tok/s, the plain decode loop "
                  f"{one['plain']:.1f} tok/s: {one['ratio'] or 0:.3f}x", ""]
    if report.get("engine"):
        lines += ["engine vs engine (same weights, float32, greedy; decode tok/s once every row decodes)",
                  f"{'batch':>6s} {'lfm_mlx':>10s} {'mlx_lm BG':>10s} {'ratio':>7s}"]
    for B, row in report.get("engine", {}).items():
        lines.append(f"{B:>6} {row['lfm_mlx']:10.1f} {row['mlx_lm']:10.1f} {row['ratio'] or 0:6.2f}x")
    servers = report.get("servers", {})
    for mix in servers:
        lines += ["", f"server vs server, {mix} mix (each at its defaults; {report['seconds']:.0f} s per level)",
                  f"{'C':>4s} {'server':9s} {'tok/s':>8s} {'req/s':>6s} {'done':>5s} {'TTFT p50':>9s} {'TTFT p95':>9s} "
                  f"{'ITL p50':>8s} {'ITL p95':>8s} {'errors':>6s} {'peak MB':>8s}"]
        for C, by_server in servers[mix].items():
            for name, r in by_server.items():
                lines.append(f"{C:>4} {name:9s} {r['output_tok_s']:8.1f} {r['requests_s']:6.2f} {r['requests_done']:5d} "
                             f"{_fmt(r['ttft_p50_s']):>9s} {_fmt(r['ttft_p95_s']):>9s} {_fmt(r['itl_p50_s']):>8s} "
                             f"{_fmt(r['itl_p95_s']):>8s} {r['errors']:6d} {r['peak_rss_mb']:8.0f}")
            for peer in [n for n in by_server if n != "lfm_mlx" and by_server[n]["output_tok_s"]]:
                if "lfm_mlx" in by_server:
                    ratio = by_server["lfm_mlx"]["output_tok_s"] / by_server[peer]["output_tok_s"]
                    lines.append(f"{'':>4} {'ratio':9s} {ratio:7.2f}x lfm_mlx / {peer}")
        one, many = servers[mix].get(1, {}), servers[mix].get(16, {})
        growth = [f"{name} tok/s {many[name]['output_tok_s'] / r['output_tok_s']:.2f}x, ITL p95 "
                  f"{many[name]['itl_p95_s'] / r['itl_p95_s']:.1f}x" for name, r in one.items()
                  if name in many and r["output_tok_s"] and r["itl_p95_s"] and many[name]["itl_p95_s"]]
        if growth:
            lines.append("from 1 client to 16: " + "; ".join(growth))
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m lfm_mlx.bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an MLX checkpoint directory with a tokenizer (default: random 350M-shape 4-bit)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--seconds", type=float, default=60.0, help="per concurrency level (default 60)")
    p.add_argument("--mixes", default="chat,extract")
    p.add_argument("--servers", default="lfm_mlx,mlx_lm,llama_cpp")
    p.add_argument("--engine-batches", default="1,16", help="batch sizes of the engine comparison ('' to skip)")
    p.add_argument("--skip-single", action="store_true", help="skip the one-stream comparison")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lfm_mlx_bench"))
    args = p.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - {"lfm_mlx", "mlx_lm", "llama_cpp"}
    if unknown:
        p.error(f"unknown --servers {', '.join(sorted(unknown))}: choose from lfm_mlx, mlx_lm, llama_cpp")
    try:
        path = weights(args)
        report = {"model": str(path), "seconds": args.seconds}
        if not args.skip_single:
            report["single"] = single_stream(path)
        batches = [int(b) for b in args.engine_batches.split(",") if b]
        if batches:
            report["engine"] = engine_vs_engine(path, batches)
        llama = None
        if "llama_cpp" in servers:
            try:
                llama = llama_cpp(args)
            except (OSError, subprocess.SubprocessError, StopIteration) as e:
                print(f"llama.cpp's server skipped: {e}", flush=True)
                servers.remove("llama_cpp")
        if servers:
            report["servers"] = server_vs_server(path, servers, args.mixes.split(","),
                                                 [int(c) for c in args.concurrency.split(",")], args.seconds, llama)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"python -m lfm_mlx.bench serve: error: {e}")
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report
