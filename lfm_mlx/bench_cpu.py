"""CPU speed against llama.cpp and mlx-lm, in one run: ``python -m lfm_mlx.bench cpu``.

    python -m lfm_mlx.bench cpu [--threads N] [--budget SECONDS] [--tokens N] [--no-llama-cpp]
                                [--no-busy] [--json out.json] [--cache-dir DIR]

The same random weights in the LFM2-350M shape (bf16, written by transformers) for all three:
lfm_mlx and mlx-lm load them 4-bit (mlx-lm's quantizer, group 64, float32 compute for both), llama.cpp
as Q4_0. llama.cpp is built from the ``llama-cpp-python`` source distribution's vendored copy (``pip
download --no-binary llama-cpp-python --no-deps llama-cpp-python``; CMake targets ``llama-bench`` and
``llama-quantize``; weights converted with its ``convert_hf_to_gguf.py``), cached under
``--cache-dir``; when it cannot be built the column is skipped with the reason. Its AMX path is left
out on x86-64 (it crashed in this VM, and neither MLX nor lfm_mlx uses AMX).

Measured: the machine's memory bandwidth (a 256 MB copy); decode tok/s after 128 and 8k tokens of
context, prefill tok/s at P = 512 and 2048; the same decode and P = 512 again beside one busy process
(``python -c "while True: pass"``); the bandwidth each decode implies (bytes of weights read per token
x tok/s); lfm_mlx's per-token profile (quantized products, the rest of the step, building the graph);
and how far int8 activations (the default) are from float ones: greedy agreement over a long run,
teacher-forced, and the logits' error. A program that prints tables, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .bench_serve import TOKENIZER

PROMPTS = (512, 2048)
CONTEXTS = (128, 8192)
TINY_PROMPTS, TINY_CONTEXTS = (32, 64), (16, 64)


# --- the machine ---------------------------------------------------------------------------------

def memory_bandwidth(size: int = 1 << 28) -> float:
    """GB/s of a large copy (bytes read + written), best of five: what memory gives one thread."""
    a = np.ones(size, np.uint8)
    b = np.empty_like(a)
    best = min(_seconds(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * size / best / 1e9


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Busy:
    """One process spinning on a core while the block runs: a shared machine."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


# --- llama.cpp -----------------------------------------------------------------------------------

def build_llama_cpp(cache: Path, targets: tuple = ("llama-bench", "llama-quantize")) -> Path:
    """llama.cpp's ``targets`` (programs) from llama-cpp-python's sdist; their directory."""
    bin_dir = cache / "llama.cpp" / "build" / "bin"
    if all((bin_dir / t).is_file() for t in targets):
        return bin_dir
    if shutil.which("cmake") is None:
        raise OSError("cmake was not found")
    root = cache / "llama.cpp"
    if not (root / "CMakeLists.txt").is_file():  # the source, once; more targets build beside the first
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            # The source distribution only (":all:" would also build its build tools, CMake itself, from source).
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", "llama-cpp-python",
                            "--no-deps", "llama-cpp-python", "-d", tmp], check=True, capture_output=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            shutil.rmtree(root, ignore_errors=True)
            shutil.move(str(source), root)
    flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() in ("x86_64", "AMD64") else ""
    print(f"building llama.cpp ({', '.join(targets)}; a few minutes, once)…", flush=True)
    for command in (
        ["cmake", "-S", str(root), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"],
        ["cmake", "--build", str(root / "build"), "-j", "--target", *targets],
    ):
        done = subprocess.run(command, capture_output=True, text=True, errors="replace")
        if done.returncode != 0:
            raise OSError(f"{' '.join(command[:2])} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return bin_dir


def q4_0_weights(bin_dir: Path, source: Path, cache: Path) -> Path:
    """``source`` (an HF directory with a tokenizer) as a Q4_0 GGUF, by llama.cpp's own tools."""
    out = cache / f"{source.name}-q4_0.gguf"
    if out.is_file():
        return out
    root = bin_dir.parents[1]
    f16 = cache / f"{source.name}-f16.gguf"
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
    for command in (
        [sys.executable, str(root / "convert_hf_to_gguf.py"), str(source), "--outfile", str(f16), "--outtype", "f16"],
        [str(bin_dir / "llama-quantize"), str(f16), str(out) + ".tmp", "Q4_0"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", env=env)
        if done.returncode != 0:
            raise OSError(f"{Path(command[1]).name} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    os.replace(str(out) + ".tmp", out)
    f16.unlink()
    return out


def llama_bench(bin_dir: Path, gguf: Path, threads: int, prompts=(), depths=(), tokens: int = 32) -> dict:
    """llama-bench's mean tok/s: ``{("prefill", P): …, ("decode", depth): …}``."""
    results = {}
    runs = []
    if prompts:
        runs.append(["-p", ",".join(map(str, prompts)), "-n", "0"])
    if depths:
        runs.append(["-p", "0", "-n", str(tokens), "-d", ",".join(map(str, depths))])
    for extra in runs:
        command = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "2", "-o", "json", *extra]
        done = subprocess.run(command, capture_output=True, text=True, errors="replace")
        if done.returncode != 0:
            raise OSError(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        for row in json.loads(done.stdout):
            if row["n_gen"]:
                results[("decode", row.get("n_depth", 0))] = row["avg_ts"]
            else:
                results[("prefill", row["n_prompt"])] = row["avg_ts"]
    return results


# --- lfm_mlx and mlx-lm -------------------------------------------------------------------------

def mlx_library(lib, prompts, contexts, tokens: int, budget: float) -> dict:
    from .bench import measure_decode, measure_prefill

    vocab = lib.model.args.vocab_size
    out = {("prefill", P): measure_prefill(lib, P, vocab, budget).value for P in prompts}
    out.update({("decode", c): measure_decode(lib, c, tokens, budget).value for c in contexts})
    return out


def profile(model, steps: int = 20) -> dict:
    """Milliseconds of one decode token: all quantized products in one evaluation, the whole step,
    and building its graph in Python."""
    from .cache import make_cache
    from .quantized import QuantizedEmbedding, QuantizedLinear

    layers = [m for _, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    inputs = [mx.random.normal((1, 1, l.weight.shape[1] * 32 // l.bits)) for l in layers]
    mx.eval(inputs)

    def products():
        mx.eval([l.as_linear(x) if isinstance(l, QuantizedEmbedding) else l(x) for l, x in zip(layers, inputs)])

    cache = make_cache(model)
    mx.eval(model(mx.array([list(range(100, 228))]), cache=cache))
    token = mx.array([[5]])

    def step():
        nonlocal token
        token = model(token, cache=cache)[:, -1:].argmax(-1)
        mx.eval(token)

    def per_call(fn) -> float:
        fn()
        return min(_seconds(fn) for _ in range(steps)) * 1e3

    return {"products_ms": per_call(products), "step_ms": per_call(step), "products": len(layers),
            "graph_ms": per_call(lambda: model(token, cache=cache))}


def int8_agreement(model, n: int = 256) -> dict:
    """Greedy decoding with float activations for ``n`` tokens; then the same tokens fed with int8
    activations, one at a time (teacher-forced, so one early difference does not decide the rest):
    the share of positions whose greedy token agrees, and the logits' relative error."""
    from .cache import make_cache

    def run(int8: bool, forced: Optional[list] = None):
        os.environ["LFM_MLX_INT8"] = "1" if int8 else "0"
        cache = make_cache(model)
        logits = model(mx.array([list(range(100, 164))]), cache=cache)[:, -1]
        tokens, rows = [], []
        for i in range(n):
            token = forced[i] if forced else logits.argmax(-1).item()
            rows.append(logits)
            tokens.append(token)
            logits = model(mx.array([[token]]), cache=cache)[:, -1]
        return tokens, mx.concatenate(rows)

    previous = os.environ.get("LFM_MLX_INT8")
    try:
        tokens, exact = run(False)
        _, rounded = run(True, tokens)
    finally:
        os.environ.pop("LFM_MLX_INT8") if previous is None else os.environ.update(LFM_MLX_INT8=previous)
    agree = (exact.argmax(-1) == rounded.argmax(-1)).astype(mx.float32).mean().item()
    scale = mx.abs(exact).max(-1)
    error = mx.abs(rounded - exact).max(-1) / scale
    return {"positions": n, "greedy_agreement": agree, "max_rel_error": error.max().item(),
            "mean_rel_error": error.mean().item()}


# --- the run -------------------------------------------------------------------------------------

def run(args) -> dict:
    from .bench import LFM2_350M, TINY, Ours, Theirs, nbytes, quantized_checkpoint, random_checkpoint
    from .cpu_kernel import extension, int8_activations

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    prompts, contexts = (TINY_PROMPTS, TINY_CONTEXTS) if args.tiny else (PROMPTS, CONTEXTS)
    source = random_checkpoint(cache / ("lfm2-tiny-bf16" if args.tiny else "lfm2-350m-bf16"), TINY if args.tiny else LFM2_350M)
    if (TOKENIZER / "tokenizer.json").is_file():  # llama.cpp's converter needs one
        for f in TOKENIZER.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) and not (source / f.name).exists():
                shutil.copy(f, source / f.name)
    path = quantized_checkpoint(source, 4, 64, cache)
    kernel = extension()
    threads = args.threads or (kernel.threads() if kernel else os.cpu_count())
    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "threads": threads, "memory_GBps": memory_bandwidth(),
                                "int8_activations": int8_activations(), "kernel": kernel is not None},
              "prompts": prompts, "contexts": contexts}
    print(f"weights {path}; {threads} threads; memory {report['machine']['memory_GBps']:.1f} GB/s (copy)",
          flush=True)

    columns: dict = {}
    llama = None
    if not (args.no_llama_cpp or args.tiny):  # tiny weights do not match the real tokenizer
        try:
            bin_dir = build_llama_cpp(cache)
            if not (source / "tokenizer.json").is_file():
                raise OSError(f"no tokenizer for the GGUF conversion (looked in {TOKENIZER})")
            llama = (bin_dir, q4_0_weights(bin_dir, source, cache))
        except (OSError, subprocess.SubprocessError, StopIteration) as e:
            print(f"llama.cpp column skipped: {e}", flush=True)
    if llama:
        columns["llama.cpp"] = llama_bench(*llama, threads, prompts, contexts, args.tokens)
        report["llama.cpp_bytes"] = llama[1].stat().st_size
    ours = Ours(path, "float32")
    columns["lfm_mlx"] = mlx_library(ours, prompts, contexts, args.tokens, args.budget)
    report["lfm_mlx_bytes"] = nbytes(ours.model)
    theirs = Theirs(path, "float32")
    columns["mlx_lm"] = mlx_library(theirs, prompts, contexts, args.tokens, args.budget)
    report["mlx_lm_bytes"] = nbytes(theirs.model)
    if not args.no_busy:
        with Busy():
            if llama:
                busy = llama_bench(*llama, threads, prompts[:1], contexts[:1], args.tokens)
                columns["llama.cpp"].update({(k[0] + "_busy", k[1]): v for k, v in busy.items()})
            for name, lib in (("lfm_mlx", ours), ("mlx_lm", theirs)):
                busy = mlx_library(lib, prompts[:1], contexts[:1], args.tokens, args.budget)
                columns[name].update({(k[0] + "_busy", k[1]): v for k, v in busy.items()})
    del theirs
    report["profile"] = profile(ours.model)
    report["int8"] = int8_agreement(ours.model, args.agreement_tokens)
    report["columns"] = {lib: {f"{k[0]}_{k[1]}": v for k, v in col.items()} for lib, col in columns.items()}
    return report


def table(report: dict) -> str:
    cols = report["columns"]
    names = [n for n in ("lfm_mlx", "llama.cpp", "mlx_lm") if n in cols]
    keys = list(cols["lfm_mlx"])
    lines = ["metric (tok/s)          " + "".join(f"{n:>12}" for n in names)
             + ("   lfm_mlx/llama.cpp" if "llama.cpp" in cols else "") + "   lfm_mlx/mlx_lm"]
    for key in keys:
        row = f"{key:<24}" + "".join(f"{cols[n].get(key, float('nan')):>12.1f}" for n in names)
        if "llama.cpp" in cols:
            row += f"{cols['lfm_mlx'][key] / cols['llama.cpp'][key]:>19.2f}x" if key in cols["llama.cpp"] else " " * 20
        row += f"{cols['lfm_mlx'][key] / max(cols['mlx_lm'].get(key, 0), 1e-9):>17.2f}x"
        lines.append(row)
    lines.append("")
    machine = report["machine"]
    lines.append(f"memory bandwidth (256 MB copy, one thread): {machine['memory_GBps']:.1f} GB/s")
    for n in names:
        nbytes = report[f"{n}_bytes"]
        rate = cols[n][f"decode_{report['contexts'][0]}"]
        lines.append(f"{n:<10} reads {nbytes / 1e6:6.0f} MB per token: decode at ctx {report['contexts'][0]} implies "
                     f"{nbytes * rate / 1e9:5.1f} GB/s")
    c, P = report["contexts"][0], report["prompts"][0]
    for n in names:
        if f"decode_busy_{c}" in cols[n]:
            lines.append(f"{n:<10} beside one busy process: decode {cols[n][f'decode_busy_{c}'] / cols[n][f'decode_{c}']:.0%}"
                         f" of its quiet speed, prefill {cols[n][f'prefill_busy_{P}'] / cols[n][f'prefill_{P}']:.0%}")
    p = report["profile"]
    lines.append(f"lfm_mlx per token: {p['step_ms']:.1f} ms = {p['products']} quantized products "
                 f"{p['products_ms']:.1f} ms (one evaluation) + the rest {p['step_ms'] - p['products_ms']:.1f} ms "
                 f"(norms, conv, attention, sampling; building the graph in Python: {p['graph_ms']:.1f} ms)")
    a = report["int8"]
    lines.append(f"int8 vs float activations ({'int8' if machine['int8_activations'] else 'float'} is on): greedy "
                 f"tokens agree on {a['greedy_agreement']:.1%} of {a['positions']} positions (teacher-forced); "
                 f"logits' error max {a['max_rel_error']:.2e}, mean {a['mean_rel_error']:.2e} (of max |logit|)")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.bench cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="threads for llama.cpp (default: lfm_mlx's, every core)")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per measurement")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per measurement for the MLX libraries")
    parser.add_argument("--agreement-tokens", type=int, default=256)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip building and running llama.cpp")
    parser.add_argument("--no-busy", action="store_true", help="skip the runs beside a busy process")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, no llama.cpp (CI smoke test)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lfm_mlx_bench"))
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except OSError as e:  # no torch/transformers for the random weights, a full disk
        sys.exit(f"python -m lfm_mlx.bench cpu: error: {e}")
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report
