"""Schema coverage: how many real-world JSON Schemas extraction accepts, and how many it fills validly.

    python -m lfm_mlx.bench schemas --dir ../shared/schemas-dev [--every N] [--max-tokens 512] [--model PATH]

For every ``*.json`` under ``--dir`` (one folder per dataset): ``check_schema`` (a SchemaError is a
refusal; any other exception is a bug, listed apart), the constraint's compile time (everything before
the first token: the schema check, llguidance's grammar and the shortest document; a schema whose
shortest document exceeds ``--max-tokens`` is refused at this point, BudgetError), then one greedy
extraction from a fixed paragraph and a jsonschema check of the output (formats not checked). Without
``--model``, a tiny random-weight LFM2 with the real tokenizer from ``--tokenizer``: the grammar does the
work here, so the model's size does not matter. Prints, per dataset and in total: schemas, accepted %,
shortest document over the budget, valid % of all, median compile ms and mask ms per generated token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .bench import LFM2_350M, random_checkpoint
from .bench_extraction import REFERENCE_TOKENIZER, copy_tokenizer
from .constrain import BudgetError, JSONConstraint, SchemaError, _compile, check_schema
from .extract import extract
from .loading import load

TEXT = ("Ada Lovelace (ada@example.com, +44 20 7946 0321) met Charles Babbage in London on 2024-03-12 at 10:30 "
        "to review invoice INV-0042 for 1,250.00 EUR; status: approved. Tags: math, engines. Version 1.2.0.")
TINY = dict(LFM2_350M, hidden_size=128, block_dim=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, block_ff_dim=192, full_attn_idxs=[1, 3])  # the real vocabulary


@dataclass
class Outcome:
    dataset: str
    name: str
    accepted: bool = False  # by check_schema
    over_budget: bool = False  # its shortest document takes more than max_tokens
    valid: bool = False
    compile_ms: float = 0.0
    mask_ms_per_token: float = 0.0
    reason: str = ""  # why refused, or why the output is not valid
    crash: str = ""  # an exception other than SchemaError: a bug


def measure(model, tokenizer, path: Path, max_tokens: int) -> Outcome:
    outcome = Outcome(path.parent.name, path.stem)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        _compile.cache_clear()  # time the first compile, as a new schema gets it
        start = time.perf_counter()
        check_schema(schema)
        outcome.accepted = True
        JSONConstraint(tokenizer, schema, vocab_size=model.args.vocab_size, max_tokens=max_tokens)
        outcome.compile_ms = 1000 * (time.perf_counter() - start)
        result = extract(model, tokenizer, TEXT, schema, max_tokens=max_tokens)
    except BudgetError as e:
        outcome.over_budget, outcome.reason = True, str(e)
        return outcome
    except SchemaError as e:
        outcome.reason = str(e).splitlines()[0]
        return outcome
    except Exception as e:  # a bug: counted apart
        outcome.crash = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return outcome
    outcome.valid, outcome.reason = result.valid, result.error or ""
    outcome.mask_ms_per_token = result.stats.mask_ms_per_token
    return outcome


def run(model, tokenizer, directory: Path, every: int = 1, max_tokens: int = 512, progress: bool = True) -> list[Outcome]:
    files = sorted(directory.rglob("*.json"))[::every]
    if not files:
        raise OSError(f"no *.json schemas under {directory}")
    # Per-tokenizer tables are built once, on first use: not a cost of the first schema measured.
    JSONConstraint(tokenizer, {"type": "object"}, vocab_size=model.args.vocab_size, max_tokens=max_tokens)
    outcomes = []
    for i, path in enumerate(files, 1):
        outcomes.append(measure(model, tokenizer, path, max_tokens))
        if progress:
            print(f"\r  {i}/{len(files)} {path.parent.name}/{path.name}"[:100].ljust(100), end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    lines = ["| dataset | schemas | accepted | over budget | valid (of all) | median compile ms | mask ms/token |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.dataset, []).append(o)
    for name, group in [*sorted(groups.items()), ("total", outcomes)]:
        accepted = [o for o in group if o.accepted]
        compiled = [o.compile_ms for o in accepted if o.compile_ms]
        compile_ms = statistics.median(compiled) if compiled else 0.0
        masks = [o.mask_ms_per_token for o in accepted if o.mask_ms_per_token]
        lines.append(f"| {name} | {len(group)} | {len(accepted) / len(group):.1%} | "
                     f"{sum(o.over_budget for o in group)} | "
                     f"{sum(o.valid for o in group) / len(group):.1%} | {compile_ms:.0f} | "
                     f"{statistics.median(masks) if masks else 0.0:.2f} |")
    refused = [o for o in outcomes if not o.accepted and not o.crash]
    over = [o for o in outcomes if o.over_budget]
    invalid = [o for o in outcomes if o.accepted and not o.valid and not o.crash and not o.over_budget]
    crashed = [o for o in outcomes if o.crash]
    for title, group, field in (("Refused", refused, "reason"), ("Shortest document over the budget", over, "reason"),
                                ("Accepted, output not valid", invalid, "reason"),
                                ("Exceptions other than SchemaError (bugs)", crashed, "crash")):
        if group:
            lines += ["", f"{title}:"] + [f"- {o.dataset}/{o.name}: {getattr(o, field)[:200]}" for o in group]
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> list[Outcome]:
    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.bench schemas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="a folder of JSON Schemas, one subfolder per dataset")
    parser.add_argument("--every", type=int, default=1, help="take every Nth schema (sorted by path)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--model", help="checkpoint directory (default: a tiny random-weight LFM2)")
    parser.add_argument("--tokenizer", default=str(REFERENCE_TOKENIZER), help="LFM2 tokenizer for the tiny model")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lfm_mlx_bench"))
    args = parser.parse_args(argv)
    try:
        if args.model:
            path = Path(args.model)
        else:
            Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
            path = copy_tokenizer(Path(args.tokenizer), random_checkpoint(Path(args.cache_dir) / "lfm2-tiny-vocab",
                                                                          TINY, dtype="float32"))
        model, tokenizer = load(path)
        start = time.perf_counter()
        outcomes = run(model, tokenizer, Path(args.dir), args.every, args.max_tokens)
    except (ValueError, OSError) as e:
        sys.exit(f"python -m lfm_mlx.bench schemas: error: {e}")
    print(f"{len(outcomes)} schemas from {args.dir}, max_tokens={args.max_tokens}, greedy, model {path} "
          f"({time.perf_counter() - start:.0f} s)")
    print(table(outcomes))
    return outcomes


if __name__ == "__main__":
    main(sys.argv[1:])
