"""Extraction speed: grammar fast-forward off and on, and constrained against plain decoding.

    python -m lfm_mlx.bench extraction [--model PATH] [--bits 4] [--max-tokens 192] [--tokenizer DIR]

Without ``--model``: random weights in the LFM2-350M shape (quantized with ``--bits``, as
``mlx_lm.convert`` does), with the real LFM2 tokenizer from ``--tokenizer``. Two tables, each row a
preset of ``assets/schemas`` run alone on an engine, greedy, fast-forward off (before) and on (after),
then with prompt-lookup drafts too (``--draft-tokens``):

- *Replayed outputs*: the model writes the preset's perfect extraction (``assets/expected``): an
  oracle after the constraint keeps, of the allowed tokens, the longest that continues that document.
  The forward passes are real, so this is the speed a trained model writing that document would see.
- *Free outputs*: the random model writes what it likes (long strings: the worst case for
  fast-forward), and plain decoding of the same prompt for as many tokens shows what the constraint
  costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .bench import LFM2_350M, quantized_checkpoint, random_checkpoint
from .constrain import JSONConstraint, ll_tokenizer_for
from .engine import Engine, Request
from .extract import DEFAULT_CONTEXT_BUDGET, _chunk_prompts, _prepare, extract
from .generate import encode_prompt
from .loading import load
from .sample import SamplingSettings

SCHEMAS = Path(__file__).resolve().parents[1] / "assets" / "schemas"
EXPECTED = SCHEMAS.parent / "expected"
REFERENCE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "lfm2-reference" / "LFM2-350M"


def copy_tokenizer(tokenizer: Path, checkpoint: Path) -> Path:
    """``checkpoint`` (random weights) with the tokenizer files of ``tokenizer`` beside them."""
    if not (tokenizer / "tokenizer.json").is_file():
        raise OSError(f"no tokenizer.json in {tokenizer}: pass --tokenizer DIR (an LFM2 tokenizer) or --model")
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, checkpoint / f.name)
    return checkpoint


def checkpoint(args) -> Path:
    """The model to measure: ``--model``, or random 350M-shape weights with the real tokenizer."""
    if args.model:
        return Path(args.model)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    source = copy_tokenizer(Path(args.tokenizer), random_checkpoint(cache / "lfm2-350m-bf16", LFM2_350M))
    return quantized_checkpoint(source, args.bits, 64, cache) if args.bits else source


def measure(model, tokenizer, schema: dict, text: str, max_tokens: int, fast_forward: bool) -> dict:
    """One extraction of random weights' own output: token by token, or with the engine's defaults."""
    engine = Engine(model, tokenizer, max_batch=1) if fast_forward else \
        Engine(model, tokenizer, max_batch=1, fast_forward=False, draft_tokens=0)
    result = extract(model, tokenizer, text, schema, max_tokens=max_tokens, engine=engine)
    n = result.stats.generation_tokens
    passes = engine.steps - 1  # the first step reads the prompt; one pass per step after it, one row
    return {"output": result.data, "tokens": n, "passes": passes, "per_pass": n / max(passes, 1),
            "tps": result.stats.generation_tps, "valid": result.valid}


def extraction_prompt(tokenizer, schema: dict, text: str) -> list[int]:
    schema, messages = _prepare(schema, None, None, 1)
    return encode_prompt(tokenizer, _chunk_prompts(tokenizer, messages, text, DEFAULT_CONTEXT_BUDGET)[0])


class Oracle:
    """Logits processor standing in for a trained model: of the tokens still allowed, the longest
    that continues ``document`` (as the grammar writes JSON), then EOS."""

    def __init__(self, tokenizer, document) -> None:
        ll = ll_tokenizer_for(tokenizer)
        self.target = json.dumps(document, ensure_ascii=False).encode()
        self.bytes = [ll.decode_bytes([i]) for i in range(ll.vocab_size)]
        self.ids = {b: i for i, b in reversed(list(enumerate(self.bytes))) if b and not ll.is_special_token(i)}
        self.longest = max(map(len, self.ids))
        self.eos, self.prompt_len = ll.eos_token, None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.prompt_len is None:
            self.prompt_len = tokens.size
        written = sum(len(self.bytes[t]) for t in tokens[self.prompt_len:].tolist())
        rest = self.target[written:]
        allowed = np.isfinite(np.array(logits[0].astype(mx.float32)))
        choice = self.eos if not rest else next(
            (t for n in range(min(len(rest), self.longest), 0, -1)
             if (t := self.ids.get(rest[:n])) is not None and t < allowed.size and allowed[t]), None)
        if choice is None:  # the document left the grammar: let the model go on
            return logits
        keep = mx.arange(logits.shape[-1]) == choice
        return mx.where(keep, logits, mx.array(-np.inf, logits.dtype))


def replay(model, tokenizer, schema: dict, text: str, document, fast_forward: bool, draft_tokens: int) -> dict:
    """The model writes ``document`` (steered by an Oracle) under the schema's constraint."""
    constraint = JSONConstraint(tokenizer, schema, vocab_size=model.args.vocab_size, max_tokens=1024)
    engine = Engine(model, tokenizer, max_batch=1, fast_forward=fast_forward, draft_tokens=draft_tokens)
    request = Request(extraction_prompt(tokenizer, schema, text), max_tokens=1024,
                      sampling=SamplingSettings(temperature=0.0), logits_processors=[constraint, Oracle(tokenizer, document)])
    responses = list(engine.submit(request))
    n = responses[-1].generation_tokens
    written = "".join(r.text for r in responses)
    passes = engine.steps - 1  # the first step reads the prompt; one pass per step after it, one row
    return {"output": written, "tokens": n, "passes": passes, "per_pass": n / max(passes, 1),
            "tps": responses[-1].generation_tps, "faithful": written == json.dumps(document, ensure_ascii=False)}


def plain_decoding(model, tokenizer, schema: dict, text: str, n: int) -> float:
    """Decode tok/s of the same prompt, unconstrained, for ``n`` tokens (EOS does not stop it)."""
    prompt = extraction_prompt(tokenizer, schema, text)
    engine = Engine(model, tokenizer, max_batch=1)
    engine.eos = set()
    last = None
    for last in engine.submit(Request(prompt, max_tokens=n, sampling=SamplingSettings(temperature=0.0))):
        pass
    return last.generation_tps


def run(args) -> dict:
    model, tokenizer = load(checkpoint(args))
    report: dict = {"replayed": [], "free": []}
    for schema_file in sorted(SCHEMAS.glob("*.json")):
        name = schema_file.stem
        schema = json.loads(schema_file.read_text(encoding="utf-8"))
        text = schema_file.with_suffix(".txt").read_text(encoding="utf-8")
        expected = EXPECTED / f"{name}.json"
        if expected.is_file():
            document = json.loads(expected.read_text(encoding="utf-8"))
            before, after = (replay(model, tokenizer, schema, text, document, ff, 0) for ff in (False, True))
            drafted = replay(model, tokenizer, schema, text, document, True, args.draft_tokens)
            report["replayed"].append({"preset": name, "before": before, "after": after, "drafted": drafted,
                                       "identical": before["output"] == after["output"] == drafted["output"]})
        before, after = (measure(model, tokenizer, schema, text, args.max_tokens, ff) for ff in (False, True))
        plain = plain_decoding(model, tokenizer, schema, text, after["tokens"])
        report["free"].append({"preset": name, "before": before, "after": after, "plain_tps": plain,
                               "identical": before["output"] == after["output"]})
        print(f"  {name}: done", file=sys.stderr, flush=True)
    return report


def table(report: dict) -> str:
    lines = ["Replayed outputs (each preset's perfect extraction): before → fast-forward → + prompt lookup",
             "| preset | tokens | passes | tokens/pass | tok/s | speedup | identical |",
             "|---|---|---|---|---|---|---|"]
    for r in report["replayed"]:
        b, a, d = r["before"], r["after"], r["drafted"]
        lines.append(f"| {r['preset']} | {a['tokens']} | {b['passes']} → {a['passes']} → {d['passes']} | "
                     f"{a['per_pass']:.2f} → {d['per_pass']:.2f} | {b['tps']:.1f} → {a['tps']:.1f} → {d['tps']:.1f} | "
                     f"{a['tps'] / b['tps']:.2f}× → {d['tps'] / b['tps']:.2f}× | "
                     f"{'yes' if r['identical'] and d['faithful'] else 'NO'} |")
    lines += ["", "Free outputs (random weights) and plain decoding of the same prompt:",
              "| preset | tokens | passes before → after | tokens/pass | tok/s before → after | speedup | "
              "plain tok/s | constrained/plain | identical |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["free"]:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['preset']} | {a['tokens']} | {b['passes']} → {a['passes']} | {a['per_pass']:.2f} | "
                     f"{b['tps']:.1f} → {a['tps']:.1f} | {a['tps'] / b['tps']:.2f}× | {r['plain_tps']:.1f} | "
                     f"{a['tps'] / r['plain_tps']:.2f} | {'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.bench extraction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: random weights in the LFM2-350M shape)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="quantize the random weights first")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--draft-tokens", type=int, default=4, help="prompt-lookup drafts per pass")
    parser.add_argument("--tokenizer", default=str(REFERENCE_TOKENIZER), help="LFM2 tokenizer for random weights")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lfm_mlx_bench"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        report = run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"python -m lfm_mlx.bench extraction: error: {e}")
    print(table(report))
    print(f"({time.perf_counter() - start:.0f} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
