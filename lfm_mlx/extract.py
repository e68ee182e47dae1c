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
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TextIO

import jsonschema
from tqdm import tqdm

from .cache import DEFAULT_MAX_KV_SIZE
from .constrain import (SUBSCHEMA, SUBSCHEMA_LISTS, SUBSCHEMA_MAPS, JSONConstraint, SchemaError, check_schema,
                        schema_report)
from .distributed import Work, World, read_journal, run_rounds
from .engine import Cancelled, Engine, GenerationResponse, Request
from .generate import encode_prompt, message_starts, sampling_settings
from .grounding import Span, ground
from .sample import MAX_TEMPERATURE

DEFAULT_MAX_TOKENS = 1024
DEFAULT_CONTEXT_BUDGET = 8192  # document tokens per prompt: a quarter of a 32k context
OVERLAP = 0.1  # of the budget: a fact cut by one chunk boundary is whole in the neighbouring chunk
SAVE_EVERY_S = 30.0  # the CLI rewrites its output this often while running
PREFIX_CACHE_BYTES = 64 << 20  # the system prompt and schema, prefilled once for all documents
SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "assets" / "schemas"
SYSTEM_PROMPT = ("Identify and extract information matching the following schema. "
                 "Return data as a JSON object. Missing data should be omitted.")
SCHEMA_PROMPT_CHARS = 16_000  # past this, the prompt shows a compact schema (the grammar enforces all of it)
DESCRIPTION_CHARS = 120  # the second compaction keeps this much of each description
MIN_DOCUMENT_TOKENS = 256  # the least room a prompt must leave for the document
# An output breaking a rule the grammar cannot enforce (uniqueItems, not, if/then, ...) is sampled again,
# this many times, at least this warm, before it is returned invalid.
RESAMPLES = 2
RESAMPLE_TEMPERATURE = 0.7
# What the prompt's compact schema keeps: keywords that say what a valid document is, and descriptions.
VALIDATION_KEYWORDS = frozenset({
    "type", "enum", "const", "required", "pattern", "format", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems", "uniqueItems", "minProperties",
    "maxProperties", "dependentRequired", "$ref", "description", "minContains", "maxContains"})

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
    closed_by_budget: bool = False  # max_tokens ran low: the grammar closed the JSON early (raise it for more)

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
    closed_by_budget: bool = False


# --- prompting --------------------------------------------------------------------------------------

def build_messages(schema: dict, instructions: Optional[str] = None,
                   examples: Optional[Sequence[tuple[str, Any]]] = None) -> list[dict]:
    """The system prompt and few-shot turns; the document goes in a final user turn."""
    system = SYSTEM_PROMPT + (f"\n{instructions.strip()}" if instructions and instructions.strip() else "")
    system += "\n\nSchema:\n" + schema_for_prompt(schema)
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


def schema_for_prompt(schema: dict, budget: int = SCHEMA_PROMPT_CHARS) -> str:
    """The schema as the system prompt shows it: whole when it fits `budget` characters; else without
    annotations and unused definitions, then with descriptions cut short, then with none, then
    shallower (deep parts reduced to their type). A 300 KB Kubernetes schema would otherwise cost ~50k
    prompt tokens; the grammar enforces every part of it anyway."""
    whole = json.dumps(schema, ensure_ascii=False)
    if len(whole) <= budget:
        return whole
    levels = [(description, None) for description in (DESCRIPTION_CHARS * 100, DESCRIPTION_CHARS, 0)]
    levels += [(0, depth) for depth in (12, 8, 6, 4, 3, 2)]
    for description, depth in levels:
        text = json.dumps(_without_unused_definitions(_compact(schema, description, depth)),
                          ensure_ascii=False, separators=(",", ":"))
        if len(text) <= budget:
            break
    return text


def _compact(node: Any, description: int, depth: Optional[int]) -> Any:
    """`node` with only validation keywords and descriptions cut to `description` characters; past
    `depth` levels of subschemas, only a schema's type or reference."""
    if not isinstance(node, dict):
        return node
    if depth == 0:
        return {key: node[key] for key in ("type", "$ref") if key in node}
    deeper = None if depth is None else depth - 1
    out: dict = {}
    for key, value in node.items():
        if key in SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _compact(sub, description, deeper) for name, sub in value.items()}
        elif key in SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [_compact(sub, description, deeper) for sub in value]
        elif key in SUBSCHEMA:
            out[key] = _compact(value, description, deeper)
        elif key == "description":
            if description and isinstance(value, str):
                out[key] = value if len(value) <= description else value[:description].rstrip() + "…"
        elif key in VALIDATION_KEYWORDS:
            out[key] = value
    return out


def _without_unused_definitions(schema: Any) -> Any:
    """`schema` keeping only the root's definitions reachable from its body by local `$ref`s (all of
    them when some reference has another form)."""
    if not isinstance(schema, dict):
        return schema
    defs = {(key, name): sub for key in ("$defs", "definitions") if isinstance(schema.get(key), dict)
            for name, sub in schema[key].items()}
    used: set = set()
    pending = [{key: value for key, value in schema.items() if key not in ("$defs", "definitions")}]
    while pending:
        for ref in re.findall(r'"\$ref": "([^"]*)"', json.dumps(pending.pop())):
            parts = [part.replace("~1", "/").replace("~0", "~") for part in ref.split("/")]
            if len(parts) < 3 or parts[0] != "#" or (parts[1], parts[2]) not in defs:
                if ref != "#":
                    return schema
                continue
            if (parts[1], parts[2]) not in used:
                used.add((parts[1], parts[2]))
                pending.append(defs[parts[1], parts[2]])
    return {key: ({name: sub for name, sub in value.items() if (key, name) in used}
                  if key in ("$defs", "definitions") else value) for key, value in schema.items()}


def _validator(schema: dict) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    plain = cls.VALIDATORS.get("multipleOf")
    if plain is None:
        return cls(schema)

    def multiple_of(validator, divisor, instance, schema):
        """jsonschema's check, exact where it overflows (an integer too big for a float)."""
        try:
            yield from plain(validator, divisor, instance, schema)
        except OverflowError:
            if instance in (float("inf"), float("-inf")):  # an exponent past a float's range
                yield jsonschema.ValidationError(f"{instance!r} is out of a number's range")
            elif (Fraction(str(instance)) / Fraction(str(divisor))).denominator != 1:
                yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {divisor}")

    return jsonschema.validators.extend(cls, {"multipleOf": multiple_of})(schema)


def _parse(raw: str, schema: dict) -> tuple[Any, Optional[str]]:
    """(data, None) for a valid document, else (whatever parsed, the reason)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"output is not JSON: {e}"
    error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(data))
    if error is not None:
        return data, f"output does not match the schema: {error.validator} failed at {error.json_path}: {error.message}"
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

def _requests(model, tokenizer, prompts: Iterable[list[int]], schema: dict, *, max_tokens: int,
              temperature: float, seed: Optional[int], cancel: Optional[threading.Event]) -> Iterator[Request]:
    """One engine request per chunk prompt, each with a grammar of its own, built only when the
    engine has room for it (a grammar matcher is not free)."""
    settings = sampling_settings(temperature=temperature, repetition_penalty=1.0)
    for prompt in prompts:
        constraint = JSONConstraint(tokenizer, schema, vocab_size=model.args.vocab_size, max_tokens=max_tokens)
        yield Request(prompt, max_tokens=max_tokens, sampling=settings, seed=seed, logits_processors=[constraint],
                      checkpoints=message_starts(tokenizer, prompt), cancel=cancel)


def _outputs(engine: Engine, requests: Iterable[Request],
             on_tokens: Optional[Callable[[int], None]] = None) -> Iterator[tuple[int, _Output]]:
    """(i, output) for request i as each finishes; a row that fails is an output with its error.
    ``on_tokens(n)``: n more tokens were generated (by any row)."""
    texts: dict[int, list[str]] = {}
    last: dict[int, GenerationResponse] = {}
    processors: dict[int, JSONConstraint] = {}

    def remembered(items: Iterable[Request]) -> Iterator[Request]:
        for i, request in enumerate(items):
            processors[i] = request.logits_processors[0]
            yield request

    for i, item in engine.stream_many(remembered(requests)):
        if isinstance(item, GenerationResponse):
            texts.setdefault(i, []).append(item.text)
            if on_tokens is not None:
                on_tokens(item.generation_tokens - (last[i].generation_tokens if i in last else 0))
            last[i] = item
            continue
        r, constraint = last.pop(i, None), processors.pop(i)
        stats = ExtractionStats(mask_ms_per_token=constraint.stats.ms_per_token)
        if r is not None:
            stats = ExtractionStats(r.prompt_tokens, r.generation_tokens, r.generation_tps, r.ttft_s,
                                    constraint.stats.ms_per_token, r.peak_memory_mb)
        error = f"generation failed: {item}" if isinstance(item, BaseException) else None
        yield i, _Output("".join(texts.pop(i, [])), stats, error=error,
                         closed_by_budget=constraint.closed_by_budget)


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
                      chunks=len(outputs), stats=_combined([o.stats for o in outputs]),
                      closed_by_budget=any(o.closed_by_budget for o in outputs))


def _prepare(schema: dict | type, instructions: Optional[str], examples: Optional[Sequence[tuple[str, Any]]],
             max_tokens: int) -> tuple[dict, list[dict]]:
    """Everything that can be wrong with the request, checked before any generation."""
    schema = check_schema(schema)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, not {max_tokens}")
    return schema, build_messages(schema, instructions, examples)


def _document_room(model, tokenizer, messages: list[dict], max_tokens: int) -> int:
    """Tokens of the context left for a document beside the schema, examples and reply; SchemaError
    when that is under MIN_DOCUMENT_TOKENS."""
    context = min(model.args.max_position_embeddings, DEFAULT_MAX_KV_SIZE)
    prompt = len(encode_prompt(tokenizer, messages + [{"role": "user", "content": ""}]))
    room = context - prompt - max_tokens
    if room < MIN_DOCUMENT_TOKENS:
        raise SchemaError(f"the schema (compacted) and examples take {prompt:,} prompt tokens and the reply up to "
                          f"{max_tokens:,}, leaving {max(room, 0):,} of the {context:,}-token context for the "
                          f"document (at least {MIN_DOCUMENT_TOKENS} needed): use a smaller schema, fewer "
                          "examples or a lower max_tokens")
    return room


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
            context_budget: int = DEFAULT_CONTEXT_BUDGET, engine: Optional[Engine] = None,
            cancel: Optional[threading.Event] = None,
            on_tokens: Optional[Callable[[int], None]] = None) -> Extraction:
    """Extract the object `schema` describes (a JSON Schema dict or a Pydantic model class) from `text`.

    Raises SchemaError for an unsupported or invalid schema, ValueError for bad examples, TypeError
    for a text that is not a string and ValueError for one that is empty or not valid Unicode, all
    before generating; a result that fails validation is returned with `valid` False and `error` set.
    `max_tokens` bounds each chunk's output: the grammar closes the document in time. `engine`: run
    the chunks as rows of a shared engine; `cancel`: an event that stops them (raises `Cancelled`);
    `on_tokens(n)`: n more tokens were generated (live progress). `closed_by_budget` on the result
    says the budget ran low and the grammar closed the JSON early.
    """
    problem = _text_problem(text)
    if problem:
        _prepare(schema, instructions, examples, max_tokens)  # a bad schema is named first
        raise ValueError(problem) if isinstance(text, str) else TypeError(problem)
    return extract_many(model, tokenizer, [text], schema, instructions=instructions, examples=examples,
                        max_tokens=max_tokens, temperature=temperature, seed=seed, context_budget=context_budget,
                        engine=engine, cancel=cancel, progress=False, on_tokens=on_tokens)[0]


def extract_many(model, tokenizer, texts: Sequence[str], schema: dict | type, *,
                 instructions: Optional[str] = None, examples: Optional[Sequence[tuple[str, Any]]] = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0, seed: Optional[int] = None,
                 context_budget: int = DEFAULT_CONTEXT_BUDGET, batch_size: int = 8, progress: bool = True,
                 engine: Optional[Engine] = None, cancel: Optional[threading.Event] = None,
                 on_result: Optional[Callable[[int, Extraction], None]] = None,
                 on_tokens: Optional[Callable[[int], None]] = None) -> list[Extraction]:
    """`extract` for many texts at once, results in the order given, with a progress bar.

    Every chunk of every text is a row of the continuous-batching engine (`batch_size` rows at once
    on an engine of its own, or `engine`'s): a row that finishes makes room for the next, and one
    that fails fails alone. A text that `extract` would refuse (not a string, empty, not valid
    Unicode) gives a failed Extraction and the others go on. `on_result(i, extraction)` is called as
    text i finishes, `on_tokens(n)` as n more tokens are generated; when `cancel` is set, the rows
    stop within a step and `Cancelled` is raised (what `on_result` received is all that finished).
    """
    schema, messages = _prepare(schema, instructions, examples, max_tokens)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    context_budget = min(context_budget, _document_room(model, tokenizer, messages, max_tokens))
    JSONConstraint(tokenizer, schema, vocab_size=model.args.vocab_size, max_tokens=max_tokens)  # BudgetError
    engine = engine or Engine(model, tokenizer, max_batch=batch_size, prefix_cache_bytes=PREFIX_CACHE_BYTES)
    results: list[Optional[Extraction]] = [None if _text_problem(t) is None else Extraction.failed(_text_problem(t))
                                           for t in texts]
    chunks: list[tuple[int, list[int]]] = []  # each chunk prompt: its text and its token ids
    outputs: dict[int, dict[int, _Output]] = {}  # text → chunk number → output
    expected: dict[int, int] = {}
    held: dict[int, dict[int, _Output]] = {}  # texts with an invalid chunk, to sample again

    def prompts() -> Iterator[list[int]]:
        for i, text in enumerate(texts):
            if results[i] is None:
                parts = _chunk_prompts(tokenizer, messages, text, context_budget)
                expected[i] = len(parts)
                for part in parts:
                    chunks.append((i, encode_prompt(tokenizer, part)))
                    yield chunks[-1][1]

    def finish(i: int, done: dict[int, _Output]) -> None:
        results[i] = _assemble(texts[i], schema, [done[r] for r in sorted(done)])
        bar.update(1)
        if on_result:
            on_result(i, results[i])

    requests = _requests(model, tokenizer, prompts(), schema, max_tokens=max_tokens, temperature=temperature,
                         seed=seed, cancel=cancel)
    with tqdm(total=len(texts), unit="doc", desc="extract", disable=not progress) as bar:
        for i, result in enumerate(results):
            if result is not None:
                bar.update(1)
                if on_result:
                    on_result(i, result)
        for row, output in _outputs(engine, requests, on_tokens):
            if cancel is not None and cancel.is_set():
                break
            i = chunks[row][0]
            outputs.setdefault(i, {})[row] = output
            if len(outputs[i]) == expected[i]:
                done = outputs.pop(i)
                if RESAMPLES and any(_invalid(o, schema) for o in done.values()):
                    held[i] = done  # a rule the grammar leaves to validation broke: sample it again
                else:
                    finish(i, done)
        for attempt in range(1, RESAMPLES + 1):
            again = [row for done in held.values() for row, o in done.items() if _invalid(o, schema)]
            if not again or (cancel is not None and cancel.is_set()):
                break
            retries = _requests(model, tokenizer, [chunks[row][1] for row in again], schema, max_tokens=max_tokens,
                                temperature=max(temperature, RESAMPLE_TEMPERATURE),
                                seed=None if seed is None else seed + attempt, cancel=cancel)
            for k, output in _outputs(engine, retries, on_tokens):
                if not _invalid(output, schema):
                    held[chunks[again[k]][0]][again[k]] = output
        if not (cancel is not None and cancel.is_set()):
            for i, done in sorted(held.items()):
                finish(i, done)
    if cancel is not None and cancel.is_set():
        raise Cancelled("the extraction was stopped")
    return results


def _invalid(output: _Output, schema: dict) -> bool:
    """A chunk's output that generated but is not a valid document (e.g. repeated items under uniqueItems)."""
    return output.error is None and _parse(output.raw, schema)[1] is not None


def _text_problem(text: Any) -> Optional[str]:
    """Why `text` cannot be extracted from, or None. An empty text would get invented data that
    validates; a lone surrogate (legal in JSON and in Python strings) makes the tokenizer raise."""
    if not isinstance(text, str):
        return f"text must be a string, not {type(text).__name__}"
    if not text.strip():
        return "the text is empty: there is nothing to extract"
    at = _lone_surrogate(text)
    if at is not None:
        return f"the text is not valid Unicode: a lone surrogate {text[at]!r} at character {at}"
    return None


def _lone_surrogate(text: str) -> Optional[int]:
    """Where `text` holds a character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


# --- command line -----------------------------------------------------------------------------------

def _schema_path(spec: str) -> Path:
    """The schema file `spec` names: a path, or a ready schema's name in assets/schemas ("invoice")."""
    path = Path(spec)
    if not path.is_file() and (SCHEMAS_DIR / f"{spec}.json").is_file():
        path = SCHEMAS_DIR / f"{spec}.json"
    if not path.is_file():
        raise FileNotFoundError(f"schema file not found: {spec}")
    return path


def load_schema(spec: str) -> dict:
    """A schema file, or the name of a ready schema in assets/schemas ("invoice")."""
    try:
        schema = json.loads(_schema_path(spec).read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"schema file {spec} is not valid JSON: {e}") from None
    if _lone_surrogate(json.dumps(schema, ensure_ascii=False)) is not None:
        raise ValueError(f"schema file {spec} holds a lone surrogate escape (such as \\ud800): not valid Unicode")
    return schema


Record = tuple[Any, Optional[str], Optional[str]]  # (id, text, error)


def _input_files(path: Path) -> list[Path]:
    """The files `read_records` reads: the JSONL file, or a directory's .txt/.md files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
        if not files:
            raise ValueError(f"no .txt or .md files in {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    return [path]


def read_records(path: Path) -> list[Record]:
    """JSONL of {"id", "text"} objects or bare strings (id: the line number), or a directory's
    .txt/.md files (id: the relative path). A bad line or file (not UTF-8, not JSON, a repeated id)
    becomes a record with an error."""
    files = _input_files(path)
    if path.is_dir():
        return [_read_file(p, p.relative_to(path).as_posix()) for p in files]
    records, first_line, offset = [], {}, 0
    for n, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if line.strip():
            record = _parse_record(line, n, offset)
            first = first_line.setdefault(record[0], n)
            if first != n and record[2] is None:  # --resume finds results by id: ids must be unique
                record = (record[0], None, f"line {n}: id {json.dumps(record[0], ensure_ascii=False)} "
                                           f"is already used on line {first}: give each record its own id")
            records.append(record)
        offset += len(line) + 1
    if not records:
        raise ValueError(f"no records in {path}")
    return records


def _decode(data: bytes) -> str:
    """Strict UTF-8 (an editor's byte-order mark dropped): a replaced byte would be extracted as if valid."""
    return data.decode("utf-8").removeprefix("\ufeff")


def _read_file(path: Path, record_id: str) -> Record:
    try:
        return record_id, _decode(path.read_bytes()), None
    except UnicodeDecodeError as e:
        return record_id, None, (f"{record_id}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                                 f"{e.start}): save the file as UTF-8")
    except OSError as e:
        return record_id, None, f"cannot read {record_id}: {e}"


def _parse_record(line: bytes, n: int, offset: int) -> Record:
    """Line `n` of the JSONL, which starts `offset` bytes into the file."""
    try:
        text = _decode(line)
    except UnicodeDecodeError as e:
        return n, None, (f"line {n}: not UTF-8 text (byte 0x{line[e.start]:02x} at offset {offset + e.start} "
                         "of the file): save the file as UTF-8")
    try:
        record = json.loads(text.strip())
    except json.JSONDecodeError as e:
        return n, None, f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
    if isinstance(record, str):
        return n, record, None
    if not isinstance(record, dict):
        return n, None, f'line {n}: expected a string or an object with a string "text"'
    record_id = record.get("id", n)
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) \
            or isinstance(record_id, str) and _lone_surrogate(record_id) is not None:
        return n, None, f'line {n}: "id" must be a string or an integer, not {json.dumps(record_id)}'
    if not isinstance(record.get("text"), str):
        return record_id, None, f'line {n}: expected a string or an object with a string "text"'
    return record_id, record["text"], None


def _check_outputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output that would overwrite a file read (the same file by device and inode, so
    also through a symlink or a hard link) or the other output, before any work is done."""
    read = {(st.st_dev, st.st_ino): what for what, st in ((what, p.stat()) for what, p in inputs)}
    for i, (flag, out) in enumerate(outputs):
        if out.is_dir():
            raise IsADirectoryError(f"{flag} {out} is a directory: give a file name")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output directory not found: {out.parent}")
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(f"output directory is not writable: {out.parent}")
        key = (out.stat().st_dev, out.stat().st_ino) if out.exists() else None
        if key in read:
            raise ValueError(f"{flag} {out} is {read[key]}: the results would overwrite it; "
                             f"choose another {flag} file")
        for other_flag, other in outputs[:i]:
            if out.resolve() == other.resolve() or out.exists() and other.exists() and os.path.samefile(out, other):
                raise ValueError(f"{flag} and {other_flag} are the same file ({out}): give them different names")


def _previous_rows(path: Path, records: list[Record]) -> dict[Any, dict]:
    """For --resume: an earlier run's rows by id, those that went through extraction (valid or
    not), from the output and from the journal of rows a stopped run finished after its last save.
    A record that failed before extraction (a bad line) is read again: it may be fixed now."""
    rows: dict[Any, dict] = {}
    for row in read_journal(_journal_path(path)):
        if isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and row.get("chunks", 0) > 0:
            rows.setdefault(row["id"], row)
    lines = path.read_bytes().split(b"\n") if path.exists() else []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and isinstance(row.get("valid"), bool)
                and isinstance(row.get("chunks"), int)):
            raise ValueError(f"cannot resume: line {n} of {path} is not a result of this tool; "
                             "run without --resume to start over, or choose another --output")
        if row["chunks"] > 0:
            rows.setdefault(row["id"], row)
    unknown = set(rows) - {record_id for record_id, _, _ in records}
    if unknown:  # rewriting the output would drop them
        raise ValueError(f"cannot resume: {path} holds results for ids that are not in the input "
                         f"(e.g. {json.dumps(min(unknown, key=str), ensure_ascii=False)}); run without "
                         "--resume to start over, or choose another --output")
    return rows


def write_atomic(path: Path, write: Callable[[TextIO], None]) -> None:
    """Write through a temporary file in the same directory, synced before it replaces `path`:
    readers (and a run resumed after a crash) never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _csv_cell(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _write_csv(f: TextIO, schema: dict, rows: list[dict]) -> None:
    """One row per record: id, valid, error, then one column per top-level property (nested values as JSON)."""
    fields = list(schema.get("properties", {}))
    writer = csv.writer(f)
    writer.writerow(["id", "valid", "error", *(fields or ["data"])])
    for row in rows:
        data = row.get("data")
        cells = [(data if isinstance(data, dict) else {}).get(k) for k in fields] if fields else [data]
        writer.writerow([row["id"], str(row["valid"]).lower(), row.get("error") or "", *map(_csv_cell, cells)])


class _Terminated(BaseException):
    """SIGTERM, raised where the run is; a BaseException, so no `except Exception` retries past it."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `_Terminated` (in the main thread, the only one that gets signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _sigterm_ignored() -> Iterator[None]:
    """SIGTERM does nothing meanwhile (in the main thread, the only one that gets signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _positive(value: str) -> int:
    """An argparse type, so that a bad count is refused before the model loads."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value!r}")
    return n


def _temperature(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        t = -1.0
    if not 0 <= t <= MAX_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to {MAX_TEMPERATURE:g}, not {value!r}")
    return t


def _exit_code(stopped: BaseException) -> int:
    """The shell's convention: 128 + the signal's number when one stopped the run."""
    if isinstance(stopped, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 128 + signal.SIGTERM if isinstance(stopped, _Terminated) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .resolve import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.extract",
                                     description="Extract JSON that conforms to a schema from many documents.")
    parser.add_argument("--schema", required=True, help="JSON Schema file, or a ready schema's name (e.g. invoice)")
    parser.add_argument("--input", required=True, help='JSONL of {"id", "text"} or strings, or a directory of .txt/.md')
    parser.add_argument("--output", required=True, help="JSONL: one result per record, in input order")
    parser.add_argument("--csv", help="also a CSV table: id, valid, error and one column per top-level field")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results --output already holds (by id) and extract only the other records")
    parser.add_argument("--model", help=f"local directory or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--demo", action="store_true", help="run the random-weight demo model")
    parser.add_argument("--instructions", help="extra guidance appended to the system prompt")
    parser.add_argument("--max-tokens", type=_positive, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temperature", type=_temperature, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--context-budget", type=_positive, default=DEFAULT_CONTEXT_BUDGET,
                        help="document tokens per chunk")
    parser.add_argument("--batch-size", type=_positive, default=8,
                        help="document chunks decoded together (default 8)")
    args = parser.parse_args(argv)
    world = World()  # this process alone, or one of those `mlx.launch` started

    def log(message: str) -> None:
        print(message if world.size == 1 else f"[rank {world.rank}] {message}", file=sys.stderr)

    if world.rank != 0:
        return _worker(world, args, log)
    try:  # everything that can fail on the user's input, before any output exists
        if args.instructions and _lone_surrogate(args.instructions) is not None:
            raise ValueError("--instructions is not valid Unicode (undecodable bytes in the command line)")
        source = Path(args.input)
        inputs = [("the --schema file", _schema_path(args.schema))]
        inputs += [(f"{p.relative_to(source)} in the --input directory" if source.is_dir() else "the --input file", p)
                   for p in _input_files(source)]
        outputs = [(flag, Path(p)) for flag, p in (("--output", args.output), ("--csv", args.csv)) if p]
        _check_outputs(outputs, inputs)
        schema = check_schema(load_schema(args.schema))
        if left := schema_report(schema).validated_after:
            log(f"note: the grammar cannot enforce {', '.join(left)}: checked after generation (sampled again if broken)")
        records = read_records(source)
        previous = _previous_rows(outputs[0][1], records) if args.resume else {}
    except KeyboardInterrupt as e:
        world.broadcast(json.dumps({"error": "interrupted"}).encode())
        log("interrupted before any extraction: nothing written")
        return _exit_code(e)
    except Exception as e:  # a one-line message, not a traceback
        world.broadcast(json.dumps({"error": str(e)}).encode())
        log(f"error: {e}")
        return 1
    world.broadcast(json.dumps({"schema": schema}).encode())
    loaded = _load_everywhere(world, args, schema, log)
    if loaded is None:
        return 1
    model, tokenizer = loaded

    rows: dict[int, dict] = {}  # finished rows by record index
    journal = _journal_path(outputs[0][1])
    todo = []
    for i, (record_id, text, error) in enumerate(records):
        if error:
            rows[i] = {"id": record_id, **Extraction.failed(error).to_dict()}
        elif record_id in previous:
            rows[i] = previous[record_id]
        else:
            todo.append(i)
    if previous:
        log(f"resuming: {len(previous)} records kept from {args.output}, {len(todo)} to extract")

    def save() -> list[dict]:
        done = [rows[i] for i in sorted(rows)]
        write_atomic(outputs[0][1], lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
        if args.csv:
            write_atomic(outputs[1][1], lambda f: _write_csv(f, schema, done))
        return done

    stopped, extracted = None, 0
    last_save = time.monotonic()

    def keep(i: int, row: dict) -> None:
        nonlocal extracted, last_save
        rows[i] = {"id": records[i][0], **row}
        written.write(json.dumps(rows[i], ensure_ascii=False) + "\n")  # a killed run loses nothing finished
        written.flush()
        extracted += 1
        if time.monotonic() - last_save > SAVE_EVERY_S:
            save()
            last_save = time.monotonic()

    work = _chunk_worker(model, tokenizer, schema, args, progress=world.size == 1)
    try:  # what finishes is kept, so that a stopped run can be resumed
        # Among several ranks SIGTERM (from `mlx.launch`, when a rank is lost) keeps its default: a Python
        # handler cannot run while MLX waits on a dead peer. The journal already holds what finished.
        with _sigterm_raises() if world.size == 1 else nullcontext(), \
                journal.open("a" if args.resume else "w", encoding="utf-8") as written:
            run_rounds(world, work, [(i, records[i][1]) for i in todo], on_row=keep,
                       chunk=len(todo) if world.size == 1 else 2 * args.batch_size, log=log)
    except (KeyboardInterrupt, _Terminated, Exception) as e:
        stopped = e
    with _sigterm_ignored():  # `mlx.launch` stops every rank when one is lost: the results still get saved
        what = f"error: {stopped}" if isinstance(stopped, Exception) else "interrupted"
        if stopped is not None and not extracted:  # an earlier run's output stays as it was
            log(f"{what}: no record finished; nothing written")
            return _stop(world, _exit_code(stopped))
        try:
            done = save()
        except OSError as e:
            log(f"error: cannot write the results: {e}")
            return 1
        if stopped is not None:
            log(f"{what}: {len(done)} of {len(records)} records written to {args.output}; to extract the other "
                f"{len(records) - len(done)}, run the same command again with --resume")
            return _stop(world, _exit_code(stopped))
        journal.unlink(missing_ok=True)
        valid = sum(r["valid"] for r in done)
        log(f"{len(done)} records: {valid} valid, {len(done) - valid} with errors → {args.output}")
        for r in done:
            if r.get("error"):
                log(f"  {r['id']}: {r['error']}")
        return 0


def _stop(world: World, code: int) -> int:
    """``code`` for a run that stopped early. Among several ranks, exit now: the others are gone or
    stopping, and tearing down a broken ring can block forever (a SIGTERM from ``mlx.launch`` may
    already have been ignored while the results were saved)."""
    if world.size > 1:
        sys.stderr.flush()
        os._exit(code)
    return code


def _journal_path(output: Path) -> Path:
    """Where finished rows are appended as they arrive, beside the output (removed once it is written)."""
    return output.with_name(output.name + ".journal")


def _chunk_worker(model, tokenizer, schema: dict, args: argparse.Namespace, progress: bool) -> Work:
    """A rank's work: its chunk of (index, text) records through ``extract_many``, each row emitted as it ends."""
    options = dict(instructions=args.instructions, max_tokens=args.max_tokens, temperature=args.temperature,
                   seed=args.seed, context_budget=args.context_budget, batch_size=args.batch_size, progress=progress)

    def work(chunk: list[tuple[int, str]], emit: Callable[[int, dict], None]) -> None:
        extract_many(model, tokenizer, [text for _, text in chunk], schema, **options,
                     on_result=lambda j, result: emit(chunk[j][0], result.to_dict()))
    return work


def _load_everywhere(world: World, args: argparse.Namespace, schema: dict, log: Callable[[str], None]):
    """(model, tokenizer) on this rank, once every rank has loaded its own and can fill the schema
    within --max-tokens; None (each problem logged by its rank) if any could not."""
    from .loading import load
    from .resolve import resolve_model

    loaded, problem = None, ""
    try:
        model, tokenizer = load(resolve_model(args.model, demo=args.demo, log=log).path)
        JSONConstraint(tokenizer, schema, vocab_size=model.args.vocab_size, max_tokens=args.max_tokens)  # BudgetError
        loaded = model, tokenizer
    except Exception as e:  # a one-line message, not a traceback
        problem = str(e) or type(e).__name__
        log(f"error: {problem}")
    problems = [p.decode() for p in world.gather(problem.encode()) if p]
    if problems and not problem and world.rank == 0:
        log(f"error: another rank could not start: {problems[0]}")
    return None if problems else loaded


def _worker(world: World, args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """A rank other than 0: rank 0 reads the input and writes the output; this one extracts its chunks."""
    setup = json.loads(world.broadcast(None))
    if "error" in setup:
        return 1
    loaded = _load_everywhere(world, args, setup["schema"], log)
    if loaded is None:
        return 1
    run_rounds(world, _chunk_worker(*loaded, setup["schema"], args, progress=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
