"""Structured extraction: text in, JSON that conforms to a schema out, each string traced to its source.

Prompting follows Liquid's LFM2-Extract models: a system prompt stating the task and the schema, the
document as the user turn, few-shot examples as earlier turns, greedy decoding. Decoding goes through
``JSONConstraint``, so the output parses and validates even from a random model; the repetition
penalty is off, as it fights JSON's repeated quotes and braces. A document over the context budget is
split on paragraph and sentence boundaries with overlap, extracted chunk by chunk, and merged.

CLI: ``python -m lfm_mlx.extract --schema invoice --input docs.jsonl --output out.jsonl [--csv out.csv]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

import jsonschema
import mlx.core as mx
from tqdm import tqdm

from .constrain import JSONConstraint, SchemaError, check_schema
from .generate import Prompt, batch_generate, encode_prompt, stream_generate
from .grounding import Span, ground

DEFAULT_MAX_TOKENS = 1024
DEFAULT_CONTEXT_BUDGET = 8192  # document tokens per prompt: a quarter of a 32k context
OVERLAP = 0.1  # of the budget: a fact cut by one chunk boundary is whole in the neighbouring chunk
SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "assets" / "schemas"
SYSTEM_PROMPT = ("Identify and extract information matching the following schema. "
                 "Return data as a JSON object. Missing data should be omitted.")

__all__ = ["Extraction", "ExtractionStats", "SchemaError", "extract", "extract_many", "main"]


@dataclass
class ExtractionStats:
    """What the extraction cost, as `GenerationResponse` reports it, plus the grammar's share."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    generation_tps: float = 0.0  # in a batch: the whole batch's tokens per second
    ttft_s: float = 0.0
    mask_ms_per_token: float = 0.0  # time computing the grammar mask, per generated token
    peak_memory_mb: float = 0.0


@dataclass
class Extraction:
    data: Any  # the parsed JSON (a dict for a Pydantic schema: `Model.model_validate(data)` gives the model)
    raw: str  # the generated text; with chunks, one line per chunk
    spans: dict[str, Optional[Span]]  # JSON path of each string leaf → (start, end) in the text, or None
    valid: bool  # `data` parsed and validates against the schema
    error: Optional[str] = None
    chunked: bool = False
    chunks: int = 1
    stats: ExtractionStats = field(default_factory=ExtractionStats)

    @classmethod
    def failed(cls, error: str) -> "Extraction":
        """A record that could not be extracted at all (e.g. no text)."""
        return cls(data=None, raw="", spans={}, valid=False, error=error, chunks=0)

    def to_dict(self) -> dict:
        """Plain JSON types, spans as [start, end] lists."""
        out = asdict(self)
        out["spans"] = {path: list(span) if span else None for path, span in self.spans.items()}
        return out


@dataclass
class _Output:
    """What generation gave for one chunk."""
    raw: str
    stats: ExtractionStats
    error: Optional[str] = None


# --- prompting --------------------------------------------------------------------------------------

def build_messages(schema: dict, instructions: Optional[str] = None,
                   examples: Optional[Sequence[tuple[str, Any]]] = None) -> list[dict]:
    """The system prompt and few-shot turns; the document goes in a final user turn."""
    system = SYSTEM_PROMPT + (f"\n{instructions.strip()}" if instructions and instructions.strip() else "")
    system += "\n\nSchema:\n" + json.dumps(schema, ensure_ascii=False)
    messages = [{"role": "system", "content": system}]
    validator = _validator(schema)
    for i, example in enumerate(examples or ()):
        if not (isinstance(example, (tuple, list)) and len(example) == 2 and isinstance(example[0], str)):
            raise ValueError(f"examples[{i}] must be a (text, object) pair")
        text, data = example
        error = jsonschema.exceptions.best_match(validator.iter_errors(data))
        if error is not None:
            raise ValueError(f"examples[{i}] does not match the schema: {error.message} at {error.json_path}")
        messages += [{"role": "user", "content": text},
                     {"role": "assistant", "content": json.dumps(data, ensure_ascii=False)}]
    return messages


def _validator(schema: dict) -> jsonschema.protocols.Validator:
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)


def _parse(raw: str, schema: dict) -> tuple[Any, Optional[str]]:
    """(data, None) for a valid document, else (whatever parsed, the reason)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"output is not JSON: {e}"
    error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(data))
    if error is not None:
        return data, f"output does not match the schema: {error.message} at {error.json_path}"
    return data, None


# --- long documents ---------------------------------------------------------------------------------

# Paragraphs, sentences, words: a piece is split at the next level down. Paragraphs and sentences
# always, so chunks end and overlap at sentence boundaries; words only for a sentence over budget.
_BOUNDARIES = (re.compile(r"\n[ \t]*\n\s*"), re.compile(r"(?<=[.!?;])\s+"), re.compile(r"\s+"))
_ALWAYS_SPLIT = 2


def _pieces(text: str, start: int, end: int, count: Callable[[str], int], budget: int,
            level: int = 0) -> Iterator[tuple[int, int, int]]:
    """Consecutive (start, end, tokens) covering text[start:end]; a piece still over budget after
    word splitting (one enormous "word") is halved."""
    if level >= _ALWAYS_SPLIT:
        n = count(text[start:end])
        if n <= budget or end - start < 2:
            yield start, end, n
            return
    if level < len(_BOUNDARIES):
        cuts = [m.end() for m in _BOUNDARIES[level].finditer(text, start, end) if start < m.end() < end]
        for s, e in zip([start, *cuts], [*cuts, end]):
            yield from _pieces(text, s, e, count, budget, level + 1)
    else:
        mid = (start + end) // 2
        yield from _pieces(text, start, mid, count, budget, level)
        yield from _pieces(text, mid, end, count, budget, level)


def split_text(text: str, count: Callable[[str], int], budget: int) -> list[tuple[int, int]]:
    """(start, end) character ranges of at most about `budget` tokens each, covering `text`,
    consecutive ranges sharing whole sentences: about OVERLAP × budget tokens, at least one sentence."""
    if budget < 1:
        raise ValueError(f"context_budget must be positive, not {budget}")
    if count(text) <= budget:
        return [(0, len(text))]
    pieces = list(_pieces(text, 0, len(text), count, budget))
    overlap = int(OVERLAP * budget)
    chunks, i = [], 0
    while True:
        j, total = i + 1, pieces[i][2]
        while j < len(pieces) and total + pieces[j][2] <= budget:
            total += pieces[j][2]
            j += 1
        chunks.append((pieces[i][0], pieces[j - 1][1]))
        if j == len(pieces):
            return chunks
        # the next chunk starts a few sentences back (at least one unless it is long), after this one's start
        k, back = j, 0
        while k - 1 > i and (back + pieces[k - 1][2] <= overlap or k == j and pieces[k - 1][2] <= budget // 3):
            k -= 1
            back += pieces[k][2]
        i = k


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _resolve(node: Any, root: dict) -> dict:
    """Follow local $refs; anything else (boolean schemas) counts as no constraint."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        *_, section, name = node["$ref"].split("/")
        node = root.get(section, {}).get(name, {})
    return node if isinstance(node, dict) else {}


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def merge(first: Any, later: Any, schema: dict, root: Optional[dict] = None) -> Any:
    """Objects merged key by key; arrays concatenated without duplicates (cut at maxItems);
    a scalar from `first` unless it is empty there."""
    root = schema if root is None else root
    node = _resolve(schema, root)
    if isinstance(first, dict) and isinstance(later, dict):
        properties = node.get("properties", {})
        out = dict(first)
        for key, value in later.items():
            out[key] = merge(first[key], value, properties.get(key, {}), root) if key in first else value
        return out
    if isinstance(first, list) and isinstance(later, list):
        out, seen = list(first), {_canonical(x) for x in first}
        for x in later:
            if _canonical(x) not in seen:
                seen.add(_canonical(x))
                out.append(x)
        return out[: node.get("maxItems", len(out))]
    return later if _is_empty(first) and not _is_empty(later) else first


def merge_all(documents: Sequence[Any], schema: dict) -> Any:
    """Chunk results merged in order; a chunk whose merge would break the schema (an anyOf branch,
    a minimum count) is left out, so the result stays valid."""
    merged = documents[0]
    for document in documents[1:]:
        candidate = merge(merged, document, schema)
        if _validator(schema).is_valid(candidate):
            merged = candidate
    return merged


# --- generation -------------------------------------------------------------------------------------

def _constraint(model, tokenizer, schema: dict, max_tokens: int) -> JSONConstraint:
    return JSONConstraint(tokenizer, schema, vocab_size=model.args.vocab_size, max_tokens=max_tokens)


def _generate_one(model, tokenizer, prompt: Prompt, schema: dict, *, max_tokens: int,
                  temperature: float, seed: Optional[int]) -> _Output:
    constraint = _constraint(model, tokenizer, schema, max_tokens)
    raw, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature,
                                repetition_penalty=1.0, seed=seed, logits_processors=[constraint]):
        raw += last.text
    stats = ExtractionStats(last.prompt_tokens, last.generation_tokens, last.generation_tps, last.ttft_s,
                            constraint.stats.ms_per_token, last.peak_memory_mb)
    return _Output(raw, stats)


def _generate_batch(model, tokenizer, prompts: list[list[int]], schema: dict, *, max_tokens: int,
                    temperature: float, seed: Optional[int], on_token: Callable[[int], None]) -> list[_Output]:
    """One grammar per row through `batch_generate`; the rate is the batch's, shared by its rows."""
    constraints = [_constraint(model, tokenizer, schema, max_tokens) for _ in prompts]
    first_token: list[float] = []

    def step(n: int) -> None:
        if n == 0:
            first_token.append(time.perf_counter())
        on_token(n)

    mx.reset_peak_memory()
    start = time.perf_counter()
    texts = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, temperature=temperature,
                           repetition_penalty=1.0, seed=seed, on_token=step,
                           row_logits_processors=[[c] for c in constraints])
    end = time.perf_counter()
    # a finished row's EOS is never fed back to its constraint: +1
    tokens = [min(len(c.generated) + 1, max_tokens) for c in constraints]
    tps = (sum(tokens) - len(prompts)) / (end - first_token[0]) if end > first_token[0] else 0.0
    peak = mx.get_peak_memory() / 1e6
    return [_Output(text, ExtractionStats(len(p), n, tps, first_token[0] - start, c.stats.ms_per_token, peak))
            for text, p, n, c in zip(texts, prompts, tokens, constraints)]


def _combined(stats: Sequence[ExtractionStats]) -> ExtractionStats:
    """Chunks' stats as one document's: totals, the first chunk's TTFT, the worst peak."""
    if len(stats) == 1:
        return stats[0]
    generated = sum(s.generation_tokens for s in stats)
    decode_s = sum(s.generation_tokens / s.generation_tps for s in stats if s.generation_tps)
    return ExtractionStats(
        prompt_tokens=sum(s.prompt_tokens for s in stats), generation_tokens=generated,
        generation_tps=generated / decode_s if decode_s else 0.0, ttft_s=stats[0].ttft_s,
        mask_ms_per_token=sum(s.mask_ms_per_token * s.generation_tokens for s in stats) / max(generated, 1),
        peak_memory_mb=max(s.peak_memory_mb for s in stats))


def _assemble(text: str, schema: dict, outputs: Sequence[_Output]) -> Extraction:
    """Parse and validate each chunk's output, merge the valid ones, ground the strings."""
    results = [(None, o.error) if o.error else _parse(o.raw, schema) for o in outputs]
    errors = [f"chunk {i + 1}: {e}" if len(outputs) > 1 else e for i, (_, e) in enumerate(results) if e]
    good = [data for data, error in results if error is None]
    data = merge_all(good, schema) if good else results[0][0]
    return Extraction(data=data, raw="\n".join(o.raw for o in outputs), spans=ground(data, text),
                      valid=bool(good), error=errors[0] if errors else None, chunked=len(outputs) > 1,
                      chunks=len(outputs), stats=_combined([o.stats for o in outputs]))


def _prepare(schema: dict | type, instructions: Optional[str], examples: Optional[Sequence[tuple[str, Any]]],
             max_tokens: int) -> tuple[dict, list[dict]]:
    """Everything that can be wrong with the request, checked before any generation."""
    schema = check_schema(schema)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, not {max_tokens}")
    return schema, build_messages(schema, instructions, examples)


def _chunk_prompts(tokenizer, messages: list[dict], text: str, context_budget: int) -> list[list[dict]]:
    """One conversation per chunk of `text`: the shared turns, then the chunk as the user turn."""
    def count(s: str) -> int:
        return len(tokenizer.encode(s, add_special_tokens=False))

    return [messages + [{"role": "user", "content": text[start:end].strip()}]
            for start, end in split_text(text, count, context_budget)]


# --- public API -------------------------------------------------------------------------------------

def extract(model, tokenizer, text: str, schema: dict | type, *, instructions: Optional[str] = None,
            examples: Optional[Sequence[tuple[str, Any]]] = None, max_tokens: int = DEFAULT_MAX_TOKENS,
            temperature: float = 0.0, seed: Optional[int] = None,
            context_budget: int = DEFAULT_CONTEXT_BUDGET) -> Extraction:
    """Extract the object `schema` describes (a JSON Schema dict or a Pydantic model class) from `text`.

    Raises SchemaError for an unsupported or invalid schema and ValueError for bad examples, both
    before generating; a result that fails validation is returned with `valid` False and `error` set.
    `max_tokens` bounds each chunk's output: the grammar closes the document in time.
    """
    schema, messages = _prepare(schema, instructions, examples, max_tokens)
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, not {type(text).__name__}")
    outputs = [_generate_one(model, tokenizer, prompt, schema, max_tokens=max_tokens, temperature=temperature,
                             seed=seed) for prompt in _chunk_prompts(tokenizer, messages, text, context_budget)]
    return _assemble(text, schema, outputs)


def extract_many(model, tokenizer, texts: Sequence[str], schema: dict | type, *,
                 instructions: Optional[str] = None, examples: Optional[Sequence[tuple[str, Any]]] = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0, seed: Optional[int] = None,
                 context_budget: int = DEFAULT_CONTEXT_BUDGET, batch_size: int = 8,
                 progress: bool = True) -> list[Extraction]:
    """`extract` for many texts through batched generation, in the order given, with a progress bar.

    The chunks of all texts are batched together, shortest prompts first (less padding). A text
    that is not a string gives a failed Extraction; a batch that fails is retried row by row, so one
    bad row cannot sink the others.
    """
    schema, messages = _prepare(schema, instructions, examples, max_tokens)
    rows: list[tuple[int, list[int]]] = []  # (index of the text, prompt ids) per chunk
    for i, text in enumerate(texts):
        if isinstance(text, str):
            rows += [(i, encode_prompt(tokenizer, prompt))
                     for prompt in _chunk_prompts(tokenizer, messages, text, context_budget)]
    outputs: list[Optional[_Output]] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
    pending = Counter(i for i, _ in rows)
    options = dict(max_tokens=max_tokens, temperature=temperature, seed=seed)
    step = max(batch_size, 1)
    with tqdm(total=len(texts), unit="doc", desc="extract", disable=not progress) as bar:
        bar.update(len(texts) - len(pending))
        for b in range(0, len(order), step):
            batch = order[b : b + step]
            prompts = [rows[r][1] for r in batch]
            try:
                done = _generate_batch(model, tokenizer, prompts, schema, **options,
                                       on_token=lambda n: bar.set_postfix_str(f"token {n + 1}", refresh=False))
            except Exception:
                done = [_generate_safely(model, tokenizer, p, schema, **options) for p in prompts]
            for r, output in zip(batch, done):
                outputs[r] = output
                pending[rows[r][0]] -= 1
                bar.update(pending[rows[r][0]] == 0)
    by_text: dict[int, list[_Output]] = {}
    for (i, _), output in zip(rows, outputs):
        by_text.setdefault(i, []).append(output)
    return [_assemble(text, schema, by_text[i]) if i in by_text
            else Extraction.failed(f"text must be a string, not {type(text).__name__}")
            for i, text in enumerate(texts)]


def _generate_safely(model, tokenizer, prompt: list[int], schema: dict, **options) -> _Output:
    """One row alone, its failure recorded rather than raised: the run goes on."""
    try:
        return _generate_one(model, tokenizer, prompt, schema, **options)
    except Exception as e:
        return _Output("", ExtractionStats(prompt_tokens=len(prompt)), error=f"generation failed: {e}")


# --- command line -----------------------------------------------------------------------------------

def load_schema(spec: str) -> dict:
    """A schema file, or the name of a ready schema in assets/schemas ("invoice")."""
    path = Path(spec)
    if not path.is_file() and (SCHEMAS_DIR / f"{spec}.json").is_file():
        path = SCHEMAS_DIR / f"{spec}.json"
    if not path.is_file():
        raise FileNotFoundError(f"schema file not found: {spec}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"schema file {spec} is not valid JSON: {e}") from None


Record = tuple[Any, Optional[str], Optional[str]]  # (id, text, error)


def read_records(path: Path) -> list[Record]:
    """JSONL of {"id", "text"} objects or bare strings (id: the line number), or a directory's
    .txt/.md files (id: the relative path). A bad line or file becomes a record with an error."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
        if not files:
            raise ValueError(f"no .txt or .md files in {path}")
        return [_read_file(p, p.relative_to(path).as_posix()) for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    records = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                records.append(_parse_record(line, n))
    if not records:
        raise ValueError(f"no records in {path}")
    return records


def _read_file(path: Path, record_id: str) -> Record:
    try:
        return record_id, path.read_text(encoding="utf-8"), None
    except (OSError, UnicodeDecodeError) as e:
        return record_id, None, f"cannot read {record_id}: {e}"


def _parse_record(line: str, n: int) -> Record:
    try:
        record = json.loads(line.strip())
    except json.JSONDecodeError as e:
        return n, None, f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
    if isinstance(record, str):
        return n, record, None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record.get("id", n), record["text"], None
    return (record.get("id", n) if isinstance(record, dict) else n), None, \
        f'line {n}: expected a string or an object with a string "text"'


def write_atomic(path: Path, write: Callable[[TextIO], None]) -> None:
    """Write through a temporary file in the same directory: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _csv_cell(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _write_csv(f: TextIO, schema: dict, results: list[tuple[Any, Extraction]]) -> None:
    """One row per record: id, valid, error, then one column per top-level property (nested values as JSON)."""
    fields = list(schema.get("properties", {}))
    writer = csv.writer(f)
    writer.writerow(["id", "valid", "error", *(fields or ["data"])])
    for record_id, r in results:
        data = r.data if isinstance(r.data, dict) else {}
        cells = [data.get(k) for k in fields] if fields else [r.data]
        writer.writerow([record_id, str(r.valid).lower(), r.error or "", *map(_csv_cell, cells)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .demo import DEFAULT_MODEL, resolve_model
    from .loading import load

    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.extract",
                                     description="Extract JSON that conforms to a schema from many documents.")
    parser.add_argument("--schema", required=True, help="JSON Schema file, or a ready schema's name (e.g. invoice)")
    parser.add_argument("--input", required=True, help='JSONL of {"id", "text"} or strings, or a directory of .txt/.md')
    parser.add_argument("--output", required=True, help="JSONL: one result per record, in input order")
    parser.add_argument("--csv", help="also a CSV table: id, valid, error and one column per top-level field")
    parser.add_argument("--model", help=f"local directory or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--demo", action="store_true", help="run the random-weight demo model")
    parser.add_argument("--instructions", help="extra guidance appended to the system prompt")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--context-budget", type=int, default=DEFAULT_CONTEXT_BUDGET, help="document tokens per chunk")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:  # everything that can fail on the user's input, before any output exists
        schema = check_schema(load_schema(args.schema))
        records = read_records(Path(args.input))
        outputs = [Path(p) for p in (args.output, args.csv) if p]
        for out in outputs:
            if not out.parent.is_dir():
                raise FileNotFoundError(f"output directory not found: {out.parent}")
        model, tokenizer = load(resolve_model(args.model, demo=args.demo, log=log).path)
    except Exception as e:  # a one-line message, not a traceback
        log(f"error: {e}")
        return 1

    good = [(record_id, text) for record_id, text, error in records if error is None]
    extracted = iter(extract_many(model, tokenizer, [text for _, text in good], schema,
                                  instructions=args.instructions, max_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=args.seed,
                                  context_budget=args.context_budget, batch_size=args.batch_size))
    results = [(record_id, Extraction.failed(error) if error else next(extracted))
               for record_id, _, error in records]

    write_atomic(outputs[0], lambda f: f.writelines(
        json.dumps({"id": record_id, **r.to_dict()}, ensure_ascii=False) + "\n" for record_id, r in results))
    if args.csv:
        write_atomic(outputs[1], lambda f: _write_csv(f, schema, results))
    valid = sum(r.valid for _, r in results)
    log(f"{len(results)} records: {valid} valid, {len(results) - valid} with errors → {args.output}")
    for record_id, r in results:
        if r.error:
            log(f"  {record_id}: {r.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
