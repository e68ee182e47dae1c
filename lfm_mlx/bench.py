"""Benchmark lfm_mlx against mlx-lm's own LFM2 (``mlx_lm/models/lfm2.py``) on the same weights.

    python -m lfm_mlx.bench [--model PATH] [--bits 4] [--dtype float32|bfloat16|float16|default]
                            [--json out.json] [--tiny] [--budget SECONDS]

Without ``--model`` it writes a random-weight checkpoint of the exact LFM2-350M shape (bf16, as
Liquid publishes it; needs transformers and torch) and caches it under ``--cache-dir``. ``--bits``
quantizes that checkpoint as ``mlx_lm.convert`` does (the layout both libraries read). ``--dtype float32``
makes both compute in float32 (mlx-lm's float parameters, quantization scales included, are cast);
``default`` is what each library's ``load`` gives (lfm_mlx: float32 on the CPU; mlx-lm: the checkpoint's
bf16). Both models live in one process and every measurement alternates between them, so a noisy
machine disturbs both alike; the table reports each library's best round and our/their ratio.

Measured: prefill tok/s (P = 512, 2048) through each library's own prompt processing; decode tok/s
after a 128- and an 8k-token context through each library's own decode loop (mlx-lm's
``generate_step``); peak memory of the 128-token decode run (own weights + everything the run
allocates); memory at a 32k-token context with float and 8-bit KV; batched decode throughput
(B = 1, 8, 32); and, for lfm_mlx, speculative prompt-lookup decoding on extraction-like prompts.
Long contexts are filled with random keys/values rather than prefilled: decode speed and memory do not
depend on what the cache holds, and mlx-lm's CPU prefill of 8k tokens in 4-bit would take hours.
A library whose run would exceed ``--budget`` seconds is measured on the part that fits (its rate is
flat in the prompt length on the CPU); the JSON says how many tokens each number rests on.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

# The exact shape of LiquidAI/LFM2-350M (its config.json, abridged to what shapes the model).
LFM2_350M = dict(
    model_type="lfm2", vocab_size=65536, hidden_size=1024, block_dim=1024, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=8, block_ff_dim=6656, block_multiple_of=256, block_ffn_dim_multiplier=1.0,
    block_auto_adjust_ff_dim=True, conv_L_cache=3, conv_bias=False, norm_eps=1e-5, rope_theta=1e6,
    max_position_embeddings=128_000, full_attn_idxs=[2, 5, 8, 10, 12, 14],
    bos_token_id=1, eos_token_id=7, pad_token_id=0,
)
TINY = dict(LFM2_350M, vocab_size=1024, hidden_size=256, block_dim=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, block_ff_dim=384, full_attn_idxs=[1, 3])


@dataclass
class Plan:
    prefill: tuple = (512, 2048)
    contexts: tuple = (128, 8192)
    long_context: int = 32_000
    batches: tuple = (1, 8, 32)
    decode_tokens: int = 32
    batch_steps: int = 8
    rounds: int = 2
    budget: float = 60.0  # seconds one library may spend on one measurement


TINY_PLAN = Plan(prefill=(32, 64), contexts=(16, 64), long_context=256, batches=(1, 4),
                 decode_tokens=6, batch_steps=2, rounds=1, budget=5.0)


# --- checkpoints -------------------------------------------------------------------------------

def random_checkpoint(path: Path, config: dict, dtype: str = "bfloat16") -> Path:
    """Random weights in the given shape, written by transformers (the real on-disk format)."""
    if (path / "config.json").is_file():
        return path
    try:
        import torch
        from transformers import Lfm2Config, Lfm2ForCausalLM
    except ImportError as e:
        raise OSError(f"random weights are built with torch and transformers ({e}): "
                      "pip install -r requirements-dev.txt, or pass --model") from None

    torch.manual_seed(0)
    model = Lfm2ForCausalLM(Lfm2Config(**config)).to(getattr(torch, dtype)).eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        model.save_pretrained(tmp)
        Path(tmp).rename(path)
    return path


def quantized_checkpoint(source: Path, bits: int, group_size: int, cache_dir: Path) -> Path:
    """``source`` quantized the way ``mlx_lm.convert`` does it (its own functions, in the checkpoint's
    dtype), in the layout both libraries load; tokenizer files are copied when there are any."""
    path = cache_dir / f"{source.name}-{bits}bit-g{group_size}"
    if (path / "config.json").is_file():
        return path
    import shutil

    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(source, lazy=True)
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype in ("float16", "bfloat16", "float32"):
        model.update(tree_map(
            lambda p: p.astype(getattr(mx, dtype)) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters()))
    model, config = quantize_model(model, config, group_size, bits)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        save_model(tmp, model)
        save_config(config, Path(tmp) / "config.json")
        for f in source.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                shutil.copy(f, tmp)
        Path(tmp).rename(path)
    return path


# --- the two libraries behind one interface ----------------------------------------------------

def nbytes(model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def _greedy_step(model, layers) -> Callable[[mx.array], mx.array]:
    def step(token: mx.array) -> mx.array:
        y = mx.argmax(model(token.reshape(token.shape[0], -1), cache=layers)[:, -1, :], axis=-1)
        mx.async_eval(y)
        return y

    return step


class Ours:
    name = "lfm_mlx"

    def __init__(self, path: Path, dtype: Optional[str]):
        from .loading import load_model

        self.model = load_model(path, dtype=None if dtype == "default" else dtype)

    def cache(self, batch: int = 1, kv_bits: Optional[int] = None):
        from .cache import PromptCache, make_cache

        if batch > 1:
            return make_cache(self.model, kv_bits=kv_bits)
        return PromptCache(self.model, kv_bits=kv_bits)

    def layers(self, cache) -> list:
        return cache if isinstance(cache, list) else cache.layers

    def prefill(self, cache, tokens: list, chunk: Optional[int] = None) -> None:
        from .generate import prefill

        prefill(self.model, cache, tokens, step=chunk or 512)

    def decode(self, cache, token: int, n: int, deadline: float) -> list:
        from .generate import decode_tokens

        return _timed(decode_tokens(_greedy_step(self.model, cache.layers), token, cache, n), deadline)

    def fill(self, cache, n: int, batch: int = 1) -> None:
        from .cache import KVCache

        for c in self.layers(cache):
            if isinstance(c, KVCache):
                for k, v in _random_kv(self.model.args, n, batch, self.dtype):
                    c.prepare(k.shape[2])
                    c.update_and_fetch(k, v)
            else:
                c.state, c.offset = _random_state(self.model.args, batch, self.dtype), n
        if not isinstance(cache, list):
            cache.tokens = [0] * n
        mx.eval([_arrays(c) for c in self.layers(cache)])

    @property
    def dtype(self):
        return self.model.model.embedding_norm.weight.dtype


class Theirs:
    name = "mlx_lm"

    def __init__(self, path: Path, dtype: Optional[str]):
        from mlx_lm.utils import load_model

        self.model, _ = load_model(Path(path))
        if dtype != "default":
            target = getattr(mx, dtype)
            self.model.update(tree_map(
                lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                self.model.parameters()))
        mx.eval(self.model.parameters())

    def cache(self, batch: int = 1, kv_bits: Optional[int] = None):
        from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

        cache = make_prompt_cache(self.model)
        if kv_bits:  # what generate_step's maybe_quantize_kv_cache turns the KV caches into
            cache = [QuantizedKVCache(group_size=64, bits=kv_bits) if hasattr(c, "keys") else c
                     for c in cache]
        return cache

    def layers(self, cache) -> list:
        return cache

    def prefill(self, cache, tokens: list, chunk: Optional[int] = None) -> None:
        """generate_step's prompt processing: chunks of prefill_step_size (2048), states evaluated."""
        ids = mx.array(tokens)
        step = chunk or 2048
        for i in range(0, len(tokens), step):
            self.model(ids[i : i + step][None], cache=cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()

    def decode(self, cache, token: int, n: int, deadline: float) -> list:
        from mlx_lm.generate import generate_step

        stream = generate_step(mx.array([token]), self.model, prompt_cache=cache, max_tokens=n,
                               sampler=lambda x: mx.argmax(x, axis=-1))
        return _timed((t for t, _ in stream), deadline)

    def fill(self, cache, n: int, batch: int = 1) -> None:
        for c in cache:
            if hasattr(c, "keys"):
                for k, v in _random_kv(self.model.args, n, batch, self.dtype):
                    c.update_and_fetch(k, v)
            else:
                c[0] = _random_state(self.model.args, batch, self.dtype)
        mx.eval([c.state for c in cache])

    @property
    def dtype(self):
        return self.model.model.embedding_norm.weight.dtype


def _timed(stream, deadline: float) -> list:
    """(token, time it arrived) for each token, until the stream ends or, after 4, the deadline passes."""
    out = []
    for t in stream:
        out.append((t, time.perf_counter()))
        if out[-1][1] > deadline and len(out) >= 4:
            break
    stream.close()
    return out


def _random_kv(args, n: int, batch: int, dtype, chunk: int = 2048):
    head_dim = args.hidden_size // args.num_attention_heads
    for i in range(0, n, chunk):
        shape = (batch, args.num_key_value_heads, min(chunk, n - i), head_dim)
        yield mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype)


def _random_state(args, batch: int, dtype) -> mx.array:
    return mx.random.normal((batch, args.conv_L_cache - 1, args.hidden_size)).astype(dtype)


def _arrays(c) -> list:
    kv = (getattr(c, "keys", None) or ()) + (getattr(c, "values", None) or ())
    return [a for a in (getattr(c, "state", None), *kv) if isinstance(a, mx.array)]


def _release() -> None:
    gc.collect()
    mx.clear_cache()


# --- measurements -------------------------------------------------------------------------------

@dataclass
class Result:
    value: float
    tokens: int = 0  # what the number rests on
    extra: dict = field(default_factory=dict)


def measure_prefill(lib, P: int, vocab: int, budget: float) -> Result:
    tokens = mx.random.randint(100, vocab, (P,), key=mx.random.key(P)).tolist()
    cache = lib.cache()
    # An 8-token probe says whether the whole prompt fits (a few times) the budget; if not, the library
    # is timed on as many 64-token chunks as fit (mlx-lm's CPU rate in 4-bit is flat in the length).
    t = time.perf_counter()
    lib.prefill(cache, tokens[:8], chunk=8)
    rate = 8 / (time.perf_counter() - t)
    cache = lib.cache()
    _release()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    done, t = 0, time.perf_counter()
    if P / rate <= 3 * budget:
        lib.prefill(cache, tokens)
        done = P
    else:
        while done < P and time.perf_counter() - t < budget:
            lib.prefill(cache, tokens[done : done + 64], chunk=64)
            done += 64
    seconds = time.perf_counter() - t
    peak = mx.get_peak_memory() - base + nbytes(lib.model)
    return Result(done / seconds, done, {"peak_memory_mb": peak / 1e6})


def measure_decode(lib, context: int, n: int, budget: float) -> Result:
    cache = lib.cache()
    _release()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    lib.fill(cache, context)
    times = lib.decode(cache, 5, n, time.perf_counter() + budget)
    peak = mx.get_peak_memory() - base + nbytes(lib.model)
    steps = len(times) - 1
    rate = steps / (times[-1][1] - times[0][1]) if steps else 0.0
    return Result(rate, steps, {"peak_memory_mb": peak / 1e6})


def measure_long_context(lib, context: int, kv_bits: Optional[int]) -> Result:
    cache = lib.cache(kv_bits=kv_bits)
    _release()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    lib.fill(cache, context)
    _release()
    held = mx.get_active_memory() - base
    lib.decode(cache, 5, 2, 0.0)  # two decode steps at that context
    peak = mx.get_peak_memory() - base + nbytes(lib.model)
    return Result((held + nbytes(lib.model)) / 1e6, context, {"cache_mb": held / 1e6, "peak_mb": peak / 1e6})


def measure_batch(lib, batch: int, context: int, steps: int, budget: float) -> Result:
    cache = lib.cache(batch=batch)
    lib.fill(cache, context, batch)
    step = _greedy_step(lib.model, lib.layers(cache))
    y = step(mx.full((batch, 1), 5, mx.int32))
    mx.eval(y)  # the first step warms up
    done, t = 0, time.perf_counter()
    while done < steps and (done == 0 or time.perf_counter() - t < budget):
        y = step(y)
        mx.eval(y)
        done += 1
    return Result(batch * done / (time.perf_counter() - t), batch * done)


def _decode_run(ours: Ours, prompt: list, n: int, draft_tokens: Optional[int], reference: list = ()):
    """Greedy tokens after ``prompt`` (plain, or prompt lookup with ``draft_tokens``), seconds, stats."""
    from .cache import PromptCache
    from .generate import SpeculativeStats, decode_tokens, prefill, prompt_lookup_tokens

    cache = PromptCache(ours.model)
    prefill(ours.model, cache, prompt[:-1])
    stats = SpeculativeStats()
    t = time.perf_counter()
    if draft_tokens is None:
        out = list(decode_tokens(_greedy_step(ours.model, cache.layers), prompt[-1], cache, n))
    else:
        out = list(prompt_lookup_tokens(ours.model, cache, prompt[-1], n, draft_tokens, stats=stats,
                                        reference=reference))
    return out, time.perf_counter() - t, stats


def speculative_workloads(ours: Ours, tokenizer, n: int, draft_tokens: int = 3, rounds: int = 2) -> dict:
    """Plain greedy decoding against prompt lookup on two extraction-like prompts, same tokens out.

    ``document``: a document, then a request to copy facts out of it. A trained model copies here;
    random weights do not, so on them this is the worst case (drafts found, rarely accepted).
    ``copy``: a reply that is mostly known text, as in editing. Random weights cannot be asked to copy,
    so the known text is the model's own greedy reply, given as ``reference`` (drafted from, not read).
    The cost of a verification pass (1 + k tokens against 1) gives the speedup at other acceptance rates."""
    if tokenizer is not None:
        text = (
            "Invoice 2024-117 from Northwind Traders, 42 Harbour Street, Lisbon, issued 3 March 2024 to "
            "Contoso Ltd, 9 Elm Road, Leeds. Items: 12 steel brackets at 4.50 EUR, 3 oak shelves at "
            "89.00 EUR, 1 delivery charge of 25.00 EUR. Total due 346.00 EUR by 2 April 2024. "
        ) * 3
        document = tokenizer.encode(text + "\nExtract the seller, buyer, dates and total as JSON:\n")
    else:
        doc = mx.random.randint(100, ours.model.args.vocab_size, (160,), key=mx.random.key(1)).tolist()
        document = doc + [5, 6, 7] + doc[:24]
    workloads = {"document": [], "copy": _decode_run(ours, document, n, None)[0]}
    report = {"draft_tokens": draft_tokens, "generated": n}
    for name, reference in workloads.items():
        best = {}
        for _ in range(rounds):  # alternating, best of each: a noisy machine disturbs both alike
            for drafts in (None, draft_tokens):
                out, seconds, stats = _decode_run(ours, document, n, drafts, reference)
                if drafts not in best or seconds < best[drafts][1]:
                    best[drafts] = (out, seconds, stats)
        (plain, t_plain, _), (spec, t_spec, stats) = best[None], best[draft_tokens]
        report[name] = {
            "prompt_tokens": len(document), "reference_tokens": len(reference), "identical": plain == spec,
            "plain_tok_s": len(plain) / t_plain, "prompt_lookup_tok_s": len(spec) / t_spec,
            "speedup": t_plain / t_spec, "drafted": stats.drafted, "acceptance": stats.acceptance,
            "tokens_per_pass": len(spec) / max(stats.steps, 1),
        }
    cost = verification_cost(ours, document, draft_tokens)
    expected = lambda a: sum(a**i for i in range(draft_tokens + 1))  # tokens per pass at acceptance a
    report["verify_cost_vs_step"] = cost
    report["projected_speedup"] = {f"acceptance_{a}": expected(a) / cost for a in (0.5, 0.8, 0.9)}
    return report


def verification_cost(ours: Ours, prompt: list, k: int, reps: int = 3) -> float:
    """Time of a forward pass over 1 + k tokens relative to one token, at the prompt's context."""
    from .cache import ConvCache, PromptCache
    from .generate import prefill

    cache = PromptCache(ours.model)
    prefill(ours.model, cache, prompt[:-1])
    for c in cache.layers:
        if isinstance(c, ConvCache):
            c.keep_window = True  # lets its state rewind(); a KV cache just steps its offset back
    best = {}
    for _ in range(reps):
        for width in (1, 1 + k):
            t = time.perf_counter()
            mx.eval(ours.model(mx.array([prompt[-width:]]), cache=cache.layers).argmax(-1))
            best[width] = min(best.get(width, 1e9), time.perf_counter() - t)
            for c in cache.layers:
                c.rewind(width, 0)
    return best[1 + k] / best[1]


# --- driver -------------------------------------------------------------------------------------

def run(args) -> dict:
    plan = TINY_PLAN if args.tiny else Plan()
    if args.budget is not None:
        plan.budget = args.budget
    if args.rounds is not None:
        plan.rounds = args.rounds
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.model:
        from .loading import get_model_path

        source = get_model_path(args.model)
    else:
        source = random_checkpoint(cache_dir / ("lfm2-tiny-bf16" if args.tiny else "lfm2-350m-bf16"),
                                   TINY if args.tiny else LFM2_350M)
    path = quantized_checkpoint(source, args.bits, args.group_size, cache_dir) if args.bits else source
    libs = [Ours(path, args.dtype), Theirs(path, args.dtype)]
    print(f"model {path} | device {mx.default_device()} | dtype {args.dtype}: "
          + ", ".join(f"{l.name} computes in {l.dtype}" for l in libs), flush=True)
    vocab = libs[0].model.args.vocab_size
    results: dict = {}

    def compare(key: str, measure: Callable, rounds: int = plan.rounds, best=max) -> None:
        row = {}
        for _ in range(rounds):
            for lib in libs:
                r = measure(lib)
                if lib.name not in row or best(r.value, row[lib.name]["value"]) == r.value:
                    row[lib.name] = {"value": r.value, "tokens": r.tokens, **r.extra}
                _release()
        row["ratio"] = row["lfm_mlx"]["value"] / row["mlx_lm"]["value"] if row["mlx_lm"]["value"] else None
        results[key] = row
        print(f"  {key}: {row['lfm_mlx']['value']:.2f} vs {row['mlx_lm']['value']:.2f}", flush=True)

    for lib in libs:  # warm-up: the first calls build kernels (mx.compile, the CPU kernel)
        cache = lib.cache()
        lib.prefill(cache, list(range(100, 108)))
        lib.decode(cache, 5, 2, 0.0)
    for P in plan.prefill:
        compare(f"prefill_tok_s_P{P}", lambda lib: measure_prefill(lib, P, vocab, plan.budget))
    for ctx in plan.contexts:
        compare(f"decode_tok_s_ctx{ctx}", lambda lib: measure_decode(lib, ctx, plan.decode_tokens, plan.budget))
    row = results[f"decode_tok_s_ctx{plan.contexts[0]}"]
    results["peak_memory_mb"] = {
        name: {"value": row[name]["peak_memory_mb"]} for name in ("lfm_mlx", "mlx_lm")}
    results["peak_memory_mb"]["ratio"] = row["lfm_mlx"]["peak_memory_mb"] / row["mlx_lm"]["peak_memory_mb"]
    for kv_bits in (None, 8):
        compare(f"memory_mb_ctx{plan.long_context}_kv{kv_bits or 'float'}",
                lambda lib: measure_long_context(lib, plan.long_context, kv_bits), rounds=1, best=min)
    for B in plan.batches:
        compare(f"batch_decode_tok_s_B{B}",
                lambda lib: measure_batch(lib, B, plan.contexts[0], plan.batch_steps, plan.budget))

    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    speculative = speculative_workloads(libs[0], tokenizer, 4 * plan.decode_tokens)
    print(f"  speculative: {speculative}", flush=True)
    return {
        "config": {"model": str(path), "bits": args.bits, "group_size": args.group_size, "dtype": args.dtype,
                   "compute_dtype": {l.name: str(l.dtype) for l in libs}, "plan": plan.__dict__,
                   "device": str(mx.default_device()), "mlx": mx.__version__, "platform": platform.platform()},
        "results": results,
        "speculative": speculative,
    }


def table(report: dict) -> str:
    lines = [f"{'metric':34s} {'lfm_mlx':>12s} {'mlx_lm':>12s} {'ours/theirs':>12s}"]
    for key, row in report["results"].items():
        ours, theirs, ratio = row["lfm_mlx"]["value"], row["mlx_lm"]["value"], row.get("ratio")
        note = ""
        for name in ("lfm_mlx", "mlx_lm"):
            extra = {k: v for k, v in row[name].items() if k not in ("value", "tokens", "peak_memory_mb")}
            if "tokens" in row[name] and key.startswith("prefill") and row[name]["tokens"] < int(key.split("P")[1]):
                note += f"  ({name}: first {row[name]['tokens']} tokens)"
            if extra:
                note += f"  ({name}: " + ", ".join(f"{k} {v:.0f}" for k, v in extra.items()) + ")"
        lines.append(f"{key:34s} {ours:12.2f} {theirs:12.2f} {ratio or 0:11.2f}x{note}")
    s = report["speculative"]
    for name in ("document", "copy"):
        w = s[name]
        lines.append(
            f"speculative prompt lookup, {name} ({s['draft_tokens']} drafts): {w['plain_tok_s']:.2f} -> "
            f"{w['prompt_lookup_tok_s']:.2f} tok/s ({w['speedup']:.2f}x), acceptance {w['acceptance']:.0%} of "
            f"{w['drafted']} drafted, {w['tokens_per_pass']:.2f} tokens/pass, identical to greedy: {w['identical']}")
    lines.append(
        f"  a {1 + s['draft_tokens']}-token verification pass costs {s['verify_cost_vs_step']:.2f} decode steps: "
        + ", ".join(f"{v:.2f}x at {k.split('_')[1]} acceptance" for k, v in s["projected_speedup"].items()))
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> dict:
    if argv and argv[0] == "serve":  # python -m lfm_mlx.bench serve: serving under concurrency
        from .bench_serve import main as serve

        return serve(argv[1:])
    if argv and argv[0] == "schemas":  # python -m lfm_mlx.bench schemas --dir DIR: schema coverage
        from .bench_schemas import main as schemas

        return schemas(argv[1:])
    if argv and argv[0] == "cpu":  # python -m lfm_mlx.bench cpu: against llama.cpp, quiet and busy
        from .bench_cpu import main as cpu

        return cpu(argv[1:])
    if argv and argv[0] == "extraction":  # python -m lfm_mlx.bench extraction: fast-forward, constraint cost
        from .bench_extraction import main as extraction

        return extraction(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or hub id, float or MLX-quantized "
                        "(default: random weights in the LFM2-350M shape)")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="quantize first, as mlx_lm.convert does")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "default"))
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short runs (CI smoke test)")
    parser.add_argument("--budget", type=float, help="seconds per library per measurement (default 60)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per measurement (default 2)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lfm_mlx_bench"))
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except (ValueError, OSError) as e:  # a bad --model, no network for a hub id, no torch
        sys.exit(f"python -m lfm_mlx.bench: error: {e}")
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
