"""Constrained decoding with llguidance, as an mlx-lm logits processor: JSON Schema, tool calls,
or any llguidance grammar.

The JSON grammar allows no free whitespace (separators are exactly ", " and ": ", as
json.dumps writes them), so a model cannot pad a document with blanks forever, and
after the top-level value only EOS is allowed. The tool-call grammar is LFM2's call
syntax around such JSON values. Strings, numbers and arrays without bounds can still
run long: given `max_tokens`, the constraint forces a short closing sequence when the
budget is about to run out, so the document is always complete.
"""

from __future__ import annotations

import json
import keyword
import re
import time
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jsonschema
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .patterns import compile_pattern, schema_patterns
from .tools import TOOL_CALL_END, TOOL_CALL_START, tool_function

# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
SUBSCHEMA = frozenset({"items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
                       "additionalItems", "unevaluatedProperties", "unevaluatedItems"})
SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                            "dependencies"})
# The other keywords of JSON Schema (drafts 4 to 2020-12) that say what a valid document is, and the
# identifiers $refs may point through. Any other key is an annotation (the spec's word): ignored.
VALUE_KEYWORDS = frozenset({
    "type", "enum", "const", "required", "pattern", "format", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems", "uniqueItems", "minProperties",
    "maxProperties", "dependentRequired", "minContains", "maxContains", "$ref", "$schema", "$id", "id",
    "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor"})
# What a tool's `parameters` may say at its top level: the call grammar enforces exactly these.
PARAMETERS_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "$defs", "definitions"})
MAX_SCHEMA_CHARS = 2_000_000  # as JSON; real-world schemas reach ~900 KB (SchemaStore)
MAX_SCHEMA_DEPTH = 64  # nesting of the schema document itself
SEPARATORS = b"@:./-TZ+"  # what moves a format on to its next part: e-mail, URI, host name, date-time
FORCE_SLACK = 20  # closing starts this early: room to finish a value opened meanwhile (a date-time: ~16)
MAX_STRING_TRACKED = 4096  # bytes of an open string kept for completing its pattern
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llguidance's lenient mode: what it cannot enforce (oneOf as anyOf, `not`, `uniqueItems`, unknown formats...)
# is left out of the grammar with a warning; jsonschema checks the whole schema after generation.
LENIENT_OPTIONS = {**JSON_OPTIONS, "lenient": True}


class SchemaError(ValueError):
    """The schema is invalid, or uses something the constraint cannot enforce."""


class BudgetError(SchemaError):
    """max_tokens is below the schema's shortest complete document (`minimum` tokens)."""

    def __init__(self, max_tokens: int, minimum: int) -> None:
        super().__init__(f"max_tokens={max_tokens:,} is too small for this schema: its shortest complete document "
                         f"takes {minimum:,} tokens; set max_tokens to at least {minimum:,}")
        self.minimum = minimum


@lru_cache(maxsize=4096)
def _pattern_compiles(pattern: str) -> bool:
    """llguidance's regex dialect has no lookarounds or backreferences."""
    grammar = LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern})
    return not LLMatcher.validate_grammar(grammar)


def _walk(node: Any, path: str, dropped: list[str], close: bool = True) -> Any:
    """The schema as the grammar gets it: annotations (any key that is not a keyword) left out, patterns
    llguidance cannot compile left to validation (named in `dropped`), and with `close`, objects declaring
    all their required `properties` closed to other keys (stricter, so the output stays valid, and a model
    cannot wander off into invented keys; not where `allOf` may merge them with other properties)."""
    if not isinstance(node, dict):
        return node  # boolean schema
    out: dict = {}
    for key, value in node.items():
        if key in SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _walk(sub, f"{path}.{key}.{name}", dropped, close) for name, sub in value.items()}
        elif key in SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [_walk(sub, f"{path}.{key}[{i}]", dropped, close) for i, sub in enumerate(value)]
        elif key in SUBSCHEMA:
            out[key] = _walk(value, f"{path}.{key}", dropped, close)
        elif key == "pattern" and isinstance(value, str) and not _pattern_compiles(value):
            dropped.append(f"pattern at {path}")
        elif key in VALUE_KEYWORDS:
            out[key] = value
    if close and isinstance(out.get("properties"), dict) and set(out.get("required", ())) <= out["properties"].keys() \
            and not ({"patternProperties", "anyOf", "oneOf", "$ref"} & out.keys()):
        out.setdefault("additionalProperties", False)
    return out


@dataclass(frozen=True)
class SchemaReport:
    """What the grammar enforces token by token, and what only jsonschema checks once a document is
    complete (an extraction failing it is sampled again, then reported invalid with the rule and path)."""

    enforced: tuple[str, ...]  # the schema's keywords, as the grammar enforces them
    validated_after: tuple[str, ...]  # what the grammar leaves out, e.g. "uniqueItems", "oneOf (as anyOf)"

    def summary(self) -> str:
        if not self.validated_after:
            return "✓ Schema is valid and supported: the grammar enforces all of it."
        return ("✓ Schema is valid and supported. Checked after generation (resampled if broken): "
                + ", ".join(self.validated_after) + ".")


@dataclass(frozen=True)
class _Compiled:
    grammar: str
    report: SchemaReport


def _keywords(node: Any) -> set[str]:
    """Every keyword used anywhere in the schema."""
    found, stack = set(), [node]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack += node
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in SUBSCHEMA_MAPS and isinstance(value, dict):
                    found.add(key)
                    stack += value.values()
                elif key in SUBSCHEMA or key in SUBSCHEMA_LISTS:
                    found.add(key)
                    stack.append(value)
                elif key in VALUE_KEYWORDS:
                    found.add(key)
    return found


def _root_as_definition(schema: dict) -> dict:
    """`schema` with its body moved into a definition when something refers to the root (`"$ref": "#"`):
    llguidance cannot resolve a recursion through a root that has other keys beside it."""
    text = json.dumps(schema, ensure_ascii=False)
    if '"$ref": "#"' not in text:
        return schema
    key = "$defs" if "$defs" in schema else "definitions"
    ref = f"#/{key}/__root__"
    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions", "$schema", "$id", "id")}
    moved = json.loads(json.dumps({"$ref": ref, key: {**schema.get(key, {}), "__root__": body}},
                                  ensure_ascii=False).replace('"$ref": "#"', f'"$ref": "{ref}"'))
    return moved


def _left_out(warnings: list[str]) -> list[str]:
    """llguidance's warnings as the constraints they leave to validation."""
    out = []
    for warning in warnings:
        if m := re.match(r"Unimplemented keys: (\[.*?\])", warning):
            out += json.loads(m.group(1))
        elif warning.startswith("oneOf"):
            out.append("oneOf (as anyOf)")
        elif m := re.match(r"Unknown format: (\S+)", warning):
            out.append(f"format {m.group(1)}")
        elif warning.startswith("min/maxProperties"):
            out.append("minProperties/maxProperties")
        else:
            out.append(warning.split(":")[0][:60])
    return out


@lru_cache(maxsize=64)
def _compile(canonical: str) -> _Compiled:
    """The grammar for a schema (as canonical JSON): as written when llguidance enforces all of it, else
    in its lenient mode; SchemaError in one line when neither compiles."""
    schema = json.loads(canonical)
    dropped: list[str] = []
    prepared = _root_as_definition(_walk(schema, "$", dropped, close="allOf" not in _keywords(schema)))
    grammar = LLMatcher.grammar_from_json_schema(prepared, overrides=JSON_OPTIONS)
    failed, warnings = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        grammar = LLMatcher.grammar_from_json_schema(prepared, overrides=LENIENT_OPTIONS)
        failed, warnings = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        error = LLMatcher.validate_grammar(grammar).strip().splitlines()[0][:300]
        raise SchemaError(f"schema rejected by llguidance: {error}")
    left_out = list(dict.fromkeys(_left_out(warnings) + ["pattern" for _ in dropped[:1]]))
    enforced = sorted(_keywords(schema) - {k for k in left_out} - {"$schema", "$id", "id"})
    return _Compiled(grammar, SchemaReport(tuple(enforced), tuple(left_out)))


def _compiled(schema: dict) -> _Compiled:
    return _compile(json.dumps(schema, ensure_ascii=False))  # key order kept: properties come in their order


def build_grammar(schema: dict) -> str:
    """llguidance grammar for `schema`: json.dumps layout, no free whitespace; what llguidance cannot
    enforce is left to validation (see `schema_report`)."""
    return _compiled(schema).grammar


def schema_report(schema: dict | type) -> SchemaReport:
    """Check the schema (SchemaError as `check_schema`) and say what the grammar enforces and what is
    only validated after generation."""
    return _compiled(check_schema(schema)).report


def check_schema(schema: dict | type) -> dict:
    """Return the JSON Schema (a dict, or a Pydantic model class's schema), or raise
    SchemaError before any generation if it is invalid or unsupported."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if not isinstance(schema, dict):
        raise SchemaError(f"schema must be a dict or a Pydantic model class, not {type(schema).__name__}")
    size = len(json.dumps(schema, ensure_ascii=False))
    if size > MAX_SCHEMA_CHARS:
        raise SchemaError(f"the schema is {size:,} characters; the limit is {MAX_SCHEMA_CHARS:,}")
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"the schema nests more than {MAX_SCHEMA_DEPTH} levels of objects and arrays deep: "
                          "flatten it or move repeated parts into $defs")
    _check_meta(schema, "invalid schema")
    _compiled(schema)
    _check_finite(schema)
    return schema


def _depth(value: Any) -> int:
    """How deeply JSON objects and arrays nest in `value`, without recursion (no stack to overflow)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if level + 1 > MAX_SCHEMA_DEPTH:
                    return level + 1
                deepest = max(deepest, level + 1)
                stack.append((child, level + 1))
    return max(deepest, 1)


def _check_finite(schema: dict) -> None:
    """Refuse a schema with a definition no finite document satisfies: `$ref`s that lead back to
    themselves (A → B → A) or recursion through required properties. llguidance accepts such
    grammars, then fails on the documents that reach them; this names the definition in one line."""
    defs = {f"#/{key}/{name}": sub for key in ("$defs", "definitions") for name, sub in schema.get(key, {}).items()}
    finite = dict.fromkeys(defs, False)  # least fixpoint: a definition is finite once shown to be

    def ends(node: Any) -> bool:
        if not isinstance(node, dict):
            return node is not False
        if "$ref" in node and not finite.get(node["$ref"], False):
            return False
        if not all(ends(sub) for sub in node.get("allOf", ())):
            return False
        for key in ("anyOf", "oneOf"):
            if key in node and not any(ends(sub) for sub in node[key]):
                return False
        properties = node.get("properties", {})
        if not all(ends(properties[name]) for name in node.get("required", ()) if name in properties):
            return False
        prefix = node.get("prefixItems", [])
        if not all(ends(sub) for sub in prefix[: node.get("minItems", 0)]):
            return False
        items = node.get("items")
        return not (node.get("minItems", 0) > len(prefix) and isinstance(items, dict) and not ends(items))

    changed = True
    while changed:
        changed = False
        for ref, sub in defs.items():
            if not finite[ref] and ends(sub):
                finite[ref] = changed = True
    used = set(re.findall(r'"\$ref": "([^"]*)"', json.dumps(schema)))
    endless = next((ref for ref in defs if not finite[ref] and ref in used), None)
    if endless is not None or not ends(schema):
        endless = endless or next(ref for ref in defs if not finite[ref])
        raise SchemaError(f"no finite document fits this schema: {endless!r} refers back to itself through "
                          "required properties or a cycle of $refs; make the recursion optional")


def _check_meta(schema: dict, what: str) -> None:
    """Raise SchemaError unless `schema` is valid against its JSON Schema metaschema."""
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SchemaError(f"{what}: {e.message} at {e.json_path}") from None


def tool_call_grammar(tools: list[dict], name: str | None = None) -> str:
    """llguidance grammar for a reply that is nothing but a tool call, then EOS.

    Exactly one call to `name` if given (a named tool_choice), else one or more calls to
    any of `tools` (tool_choice "required"), as LFM2 writes them:
    `<|tool_call_start|>[f(a=1, b="x"), g()]<|tool_call_end|>`. Each value is JSON in
    json.dumps layout valid for its parameter's schema (`parse_tool_calls` reads JSON
    as Python literals); required arguments are always there, optional ones may be
    left out, all in the order of `properties`. Tools are in OpenAI form or bare
    (see `tool_function`); ValueError (SchemaError for schemas) if a tool cannot be
    enforced: names that are not Python identifiers, `parameters` not an object schema.
    """
    functions = [tool_function(tool) for tool in tools]
    names = [function.get("name") for function in functions]
    for tool_name in names:
        _check_identifier(tool_name, "tool name")
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique: {names}")
    if name is not None:
        if name not in names:
            raise ValueError(f"tool {name!r} is not among the tools {names}")
        functions = [functions[names.index(name)]]
    if not functions:
        raise ValueError("tool_call_grammar needs at least one tool")
    calls = "call" if name is not None else 'call (", " call)*'
    lines = ["%llguidance {}", f'start: {TOOL_CALL_START} "[" {calls} "]" {TOOL_CALL_END}',
             "call: " + " | ".join(f"t{i}" for i in range(len(functions)))]
    for i, function in enumerate(functions):
        lines += _call_rules(f"t{i}", function)
    grammar = LLMatcher.grammar_from_lark("\n".join(lines))
    error = LLMatcher.validate_grammar(grammar)
    if error:  # strict: a forced call has no second try, so what the grammar cannot enforce is refused
        raise SchemaError(f"tool grammar rejected by llguidance: {error.strip().splitlines()[0][:300]}")
    return grammar


def _check_identifier(name: Any, what: str) -> None:
    # The call is read back with ast: anything else would not parse as name(arg=value).
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"{what} {name!r} is not a Python identifier, so it cannot be written as a call")


def _call_rules(rule: str, function: dict) -> list[str]:
    """Lark rules for one call: `name(` arguments `)`, required ones always, optional ones maybe."""
    name = function["name"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    path = f"$.{name}.parameters"
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise SchemaError(f"parameters of tool {name!r} must be an object schema ({{\"type\": \"object\", ...}})")
    _check_meta(parameters, f"invalid parameters of tool {name!r}")
    for key in parameters.keys() & (VALUE_KEYWORDS | SUBSCHEMA | SUBSCHEMA_LISTS | SUBSCHEMA_MAPS):
        if key not in PARAMETERS_KEYWORDS:
            raise SchemaError(f"unsupported schema keyword {key!r} at {path}")
    parameters = _walk(parameters, path, [])
    properties = parameters.get("properties", {})
    required = set(parameters.get("required", ()))
    if missing := sorted(required - properties.keys()):
        raise SchemaError(f"required parameters {missing} of tool {name!r} are not in its properties")
    defs = {key: parameters[key] for key in ("$defs", "definitions") if key in parameters}
    lines, args = [], []
    for j, (param, schema) in enumerate(properties.items()):
        _check_identifier(param, f"parameter name of tool {name!r}:")
        value = {} if schema is True else schema  # `true` accepts any JSON value
        value = {**defs, **value, "x-guidance": JSON_OPTIONS} if isinstance(value, dict) else value
        lines.append(f"{rule}_a{j}: {json.dumps(param + '=')} %json {json.dumps(value, ensure_ascii=False)}")
        args.append((f"{rule}_a{j}", param in required))
    # Tail j: the arguments from j on, each after ", " (something was written before them).
    for j, (arg, is_required) in enumerate(args[1:], start=1):
        rest = f" {rule}_r{j + 1}" if j + 1 < len(args) else ""
        lines.append(f'{rule}_r{j}: ", " {arg}{rest}' if is_required else f'{rule}_r{j}: (", " {arg})?{rest}')
    # The first argument written is any optional one up to and including the first required one.
    first = []
    for j, (arg, is_required) in enumerate(args):
        first.append(f"{arg} {rule}_r{j + 1}" if j + 1 < len(args) else arg)
        if is_required:
            break
    if not first:
        return [f'{rule}: {json.dumps(name + "()")}']
    optional = "" if required else "?"
    return [f'{rule}: {json.dumps(name + "(")} {rule}_args{optional} ")"',
            f"{rule}_args: " + " | ".join(first), *lines]


@dataclass
class _Vocab:
    """Per-tokenizer data, built once: the llguidance tokenizer and, for forced closing,
    token ranks and the best-ranked ids, outside and inside a JSON string."""
    ll: LLTokenizer
    closing: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    calm: tuple[np.ndarray, np.ndarray] = ()  # bitmasks: tokens that open nothing, outside / inside a string
    shortest: dict[str, int | None] = field(default_factory=dict)  # grammar -> tokens of its shortest document

    def prepare_closing(self) -> None:
        if not self.closing:
            self.closing, self.calm = _closing_ranks(self.ll), _calm_masks(self.ll)


_VOCABS: weakref.WeakKeyDictionary[Any, _Vocab] = weakref.WeakKeyDictionary()


def _vocab(tokenizer: Any) -> _Vocab:
    hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    if hf not in _VOCABS:
        _VOCABS[hf] = _Vocab(llguidance.hf.from_tokenizer(hf))
    return _VOCABS[hf]


def ll_tokenizer_for(tokenizer: Any) -> LLTokenizer:
    """The llguidance tokenizer for a HF tokenizer or mlx-lm TokenizerWrapper,
    cached per tokenizer object (building it takes about a second)."""
    return _vocab(tokenizer).ll


def _kind(byte: int) -> int:
    """0 digit, 1 letter (or part of a non-ASCII character), 2 anything else."""
    return 0 if 0x30 <= byte <= 0x39 else 1 if chr(byte).isalpha() or byte >= 0x80 else 2


def _closing_ranks(ll: LLTokenizer) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Outside strings: closers `]})` first (`)` ends a tool call), then ',' separators, then minimal values.
    Inside, one ranking per kind of the last byte written: a quote followed only by closers; after
    a digit or letter, a separator; then tokens of another kind than the last byte, which leave a
    format's or pattern's repetition ("P123" → "D" in a duration, "ada" → "@" in an e-mail); then
    the rest. Longer tokens first within a tier."""
    minimal = [b'""', b"0", b"[]", b"{}", b"null", b"false", b"true", b'"', b"[", b"{"]
    outside = np.full(ll.vocab_size, 1 << 30, np.int64)
    inside = np.full((3, ll.vocab_size), 1 << 30, np.int64)
    for i in range(ll.vocab_size):
        b = ll.decode_bytes([i])
        if not b or ll.is_special_token(i):
            continue
        s = b.strip()
        value = s.removeprefix(b"=")  # in a tool call, `="` or `=[]` starts the argument's value
        if s and not s.strip(b"]})"):
            outside[i] = 1000 - len(b)
        elif b.rstrip(b' "') == b",":
            outside[i] = 2000 - len(b)
        elif value in minimal:
            outside[i] = 3000 + minimal.index(value)
        else:
            outside[i] = 9000 - len(b) + 100 * (b"-" in b)  # ": 0" rather than ": -0"
        if b.startswith(b'"') and not b[1:].strip(b"]})"):  # not '",': that opens another value
            inside[:, i] = 1000 - len(b)
            continue
        for last in range(3):
            if last < 2 and len(b) == 1 and b in SEPARATORS:
                inside[last, i] = 2000 + SEPARATORS.index(b)
            else:
                inside[last, i] = (5000 if _kind(b[0]) != last else 9000) - len(b)
    return tuple((rank, np.argsort(rank, kind="stable")[:512]) for rank in (outside, *inside))


def _calm_masks(ll: LLTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Bitmasks of the tokens that cannot open a new value, key or item: outside a string, none of
    `{[,:"`; inside, no quote, or a closing quote followed only by closers. Near the end of the
    budget the model may only continue or close what is open (or take the closing plan's next token),
    so no single token can make the document longer to close than the budget left."""
    outside, inside = allocate_token_bitmask(1, ll.vocab_size), allocate_token_bitmask(1, ll.vocab_size)
    outside[:], inside[:] = 0, 0
    for i in range(ll.vocab_size):
        b = ll.decode_bytes([i])
        if not b or ll.is_special_token(i):
            continue
        if not any(c in b for c in b'{[,:"'):
            outside.view(np.uint32)[0, i // 32] |= np.uint32(1 << (i % 32))
        if b"\\" not in b and (b'"' not in b or (b.startswith(b'"') and not b[1:].strip(b" ]})"))):
            inside.view(np.uint32)[0, i // 32] |= np.uint32(1 << (i % 32))
    return outside, inside


@dataclass(frozen=True)
class _Position:
    """Where generated JSON stands: inside a string (with its raw text so far, None past
    MAX_STRING_TRACKED bytes) and just after a backslash."""
    inside: bool = False
    escaped: bool = False
    text: bytes | None = b""

    def after(self, data: bytes) -> "_Position":
        inside, escaped, text = self.inside, self.escaped, self.text
        for c in data:
            if escaped:
                escaped = False
            elif inside and c == 0x5C:
                escaped = True
            elif c == 0x22:
                inside, text = not inside, b""
                continue
            if inside and text is not None:
                text = text + bytes([c]) if len(text) < MAX_STRING_TRACKED else None
        return _Position(inside, escaped, text)

    def string_so_far(self) -> str | None:
        """The open string's value, None if unknown or cut inside an escape or a character."""
        if not self.inside or self.escaped or self.text is None:
            return None
        try:
            return json.loads(b'"' + self.text + b'"')
        except ValueError:
            return None


_BIT_SHIFTS = np.arange(32, dtype=np.uint32)


def _preferred(bitmask: np.ndarray, rank: np.ndarray, best: np.ndarray) -> int | None:
    """The allowed token of lowest rank; checking the best few first usually suffices."""
    words = bitmask.view(np.uint32)[0]
    hits = best[(words[best >> 5] >> (best & 31)) & 1 == 1]
    if hits.size:
        return int(hits[0])
    # The allowed set is then mostly small: unpack only the words that have a bit set.
    nonzero = np.flatnonzero(words)
    bits = (words[nonzero, None] >> _BIT_SHIFTS) & 1 == 1
    allowed = (nonzero[:, None] * 32 + _BIT_SHIFTS)[bits]
    return int(allowed[np.argmin(rank[allowed])]) if allowed.size else None


def use_metal() -> bool:
    """llguidance's bitmask kernel is Metal-only; elsewhere the mask is unpacked with numpy."""
    return mx.metal.is_available()


def _allowed(bitmask: np.ndarray, width: int) -> np.ndarray:
    """Boolean mask of `width` entries from an llguidance int32 bitmask (zero-padded)."""
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:width]
    return np.pad(bits, (0, width - bits.size)).view(bool)


def apply_bitmask(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """Keep allowed logits, set the others to -inf."""
    if use_metal():
        from llguidance.mlx import apply_token_bitmask
        return apply_token_bitmask(logits, bitmask)
    allowed = mx.array(_allowed(bitmask, logits.shape[-1]))
    return mx.where(allowed, logits, mx.array(-np.inf, dtype=logits.dtype))


@dataclass
class MaskStats:
    seconds: float = 0.0
    count: int = 0

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / max(self.count, 1)


class GrammarConstraint:
    """Logits processor (mlx-lm convention) keeping ONE sequence inside an llguidance `grammar`
    (from `LLMatcher.grammar_from_*`, `build_grammar` or `tool_call_grammar`).

    Called as `processor(tokens, logits)` with all token ids so far; the first call
    takes `tokens` as the prompt; the mask is computed while the forward pass runs. Text
    the grammar forces (a required key, `": "`, closing brackets) is written in its
    canonical tokens: the mask then allows just the next of them, and `fast_forward`
    hands them all to the engine at once, to be fed in one pass. With `max_tokens`, the
    output is forced closed (ending in EOS) within that many generated tokens when a
    short enough completion exists; the closing heuristics know JSON and tool calls,
    for other grammars they may take more tokens (they only ever pick allowed ones).
    """

    kind = "grammar"  # names the constraint in errors

    def __init__(self, tokenizer: Any, grammar: str, *, vocab_size: int, max_tokens: int | None = None,
                 patterns: tuple[str, ...] = ()) -> None:
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self._grammar = grammar
        self._vocab = _vocab(tokenizer)
        self._ll = self._vocab.ll
        self._matcher = LLMatcher(self._ll, grammar, log_level=0)
        if self._matcher.is_error():  # e.g. a special token this tokenizer does not have
            raise ValueError(f"grammar rejected by llguidance: {self._matcher.get_error()}")
        if max_tokens is not None:
            self._vocab.prepare_closing()
        self._patterns = [p for p in map(compile_pattern, patterns) if p is not None]
        self._bitmask = allocate_token_bitmask(1, self._ll.vocab_size)
        self._prompt_len: int | None = None
        self._position = _Position()
        self._decided: tuple[int, int | None] = (-1, None)  # (position, the token forced there)
        self._draft_states: list[tuple] = []  # the state at each draft position, to return to
        self._draft_masks: list[np.ndarray] = []  # the mask there
        self._closing: list[int] = []  # forced tokens once the budget runs out
        self._close_len = 0
        self._plan: tuple[int, ...] = ()  # the last closing plan made (it ends with EOS)
        self._guard: int | None = None  # near the end of the budget: the closing plan's next token
        self.closed_by_budget = False  # the budget ran low and the output was closed early
        self.generated: list[int] = []
        self.stats = MaskStats()

    @property
    def is_done(self) -> bool:
        """A complete output has been generated: EOS is allowed."""
        return self._matcher.is_accepting()

    def fast_forward(self, token: int, limit: int) -> list[int]:
        """Consume the sampled `token`, then the tokens forced after it (at most `limit`, never
        EOS), and return those: the engine feeds them in one pass with `token` instead of one
        step each. The output is the one token-by-token decoding gives, where the mask would
        allow each of them alone."""
        if self._prompt_len is None:
            raise RuntimeError("fast_forward() must follow a call that applied the mask")
        self._advance(int(token))
        forced: list[int] = []
        while len(forced) < limit and (token := self._forced_next()) is not None and token != self._ll.eos_token:
            self._advance(token)
            forced.append(token)
        return forced

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits width {logits.shape[-1]} != vocab_size {self.vocab_size}")
        if self._prompt_len is None:
            self._prompt_len = tokens.size
        seen = self._prompt_len + len(self.generated)
        if tokens.size < seen:
            raise RuntimeError(f"got {tokens.size} tokens, but {seen} were already consumed")
        for token in tokens[seen:].tolist():
            self._advance(token)
        mx.async_eval(logits)  # the forward pass runs while the mask is computed
        return apply_bitmask(logits, self._next_bitmask())

    def _advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"token {token} broke the {self.kind} constraint: {self._matcher.get_error()}")
        self.generated.append(token)
        if self.max_tokens is not None:
            self._position = self._position.after(self._ll.decode_bytes([token]))

    def check_drafts(self, drafts: list[int]) -> list[int]:
        """Speculation: consume the drafts that token-by-token decoding could take from here (cut at
        the first whose position's mask rejects it) and return them. `masked_at(logits, j)` applies
        the mask of the position after j of them; `keep_drafts(n)` then returns to the state after
        the first n, as if the others had never been seen."""
        self._draft_masks, self._draft_states = [self._next_bitmask().copy()], [self._state()]
        taken: list[int] = []
        for token in drafts:
            allowed = (int(self._draft_masks[-1].view(np.uint32)[0, token >> 5]) >> (token & 31)) & 1
            if not allowed or token == self._ll.eos_token:  # after EOS the matcher cannot roll back
                break
            self._advance(token)
            taken.append(token)
            self._draft_masks.append(self._next_bitmask().copy())
            self._draft_states.append(self._state())
        return taken

    def masked_at(self, logits: mx.array, j: int) -> mx.array:
        """`logits` masked as token-by-token decoding would after the first `j` drafts checked."""
        return apply_bitmask(logits, self._draft_masks[j])

    def keep_drafts(self, n: int) -> None:
        """Keep the first `n` drafts `check_drafts` consumed, forget the rest."""
        if len(self._draft_states) - 1 > n:
            self._matcher.rollback(len(self._draft_states) - 1 - n)
        (size, self._position, self._decided, closing, self._close_len, self._plan, self._guard,
         self.closed_by_budget) = self._draft_states[n]
        self._closing = list(closing)
        del self.generated[size:]
        self._draft_states, self._draft_masks = [], []

    def _state(self) -> tuple:
        """What a mask computation may change, besides the matcher (which rolls back by itself)."""
        return (len(self.generated), self._position, self._decided, tuple(self._closing), self._close_len,
                self._plan, self._guard, self.closed_by_budget)

    def _forced_next(self) -> int | None:
        """The token this position must take, decided once per position: the closing plan's
        next once the budget runs low, else the first canonical token of forced text."""
        if self._decided[0] != len(self.generated):
            if self.max_tokens is not None and not self._closing:
                self._maybe_close()
            token = self._closing.pop(0) if self._closing else next(iter(self._matcher.compute_ff_tokens()), None)
            self._decided = (len(self.generated), token)
        return self._decided[1]

    def _next_bitmask(self) -> np.ndarray:
        start = time.perf_counter()
        token = self._forced_next()
        if token is not None:
            self._bitmask[:] = 0
            self._bitmask.view(np.uint32)[0, token // 32] = 1 << (token % 32)
        else:
            fill_next_token_bitmask(self._matcher, self._bitmask)
            if self._matcher.is_error():
                raise RuntimeError(f"{self.kind} constraint failed: {self._matcher.get_error()}")
            if self._guard is not None:
                np.bitwise_and(self._bitmask, self._vocab.calm[self._position.inside], out=self._bitmask)
                self._bitmask.view(np.uint32)[0, self._guard // 32] |= np.uint32(1 << (self._guard % 32))
        self.stats.seconds += time.perf_counter() - start
        self.stats.count += 1
        return self._bitmask

    def minimal_tokens(self) -> int | None:
        """Tokens of the shortest document the closing planner finds from the start (EOS not
        counted), or None if it finds none; any budget of at least this many tokens ends in a
        complete document. Computed once per grammar and tokenizer."""
        if self._grammar not in self._vocab.shortest:
            self._vocab.prepare_closing()
            start = LLMatcher(self._ll, self._grammar, log_level=0)
            plan = self._closing_plan(1 << 16, start, _Position(), b'"')
            self._vocab.shortest[self._grammar] = None if plan is None else len(plan) - 1
        return self._vocab.shortest[self._grammar]

    def _maybe_close(self) -> None:
        """Check the closing plan every step near the end of the budget (and every 8 tokens
        before), planning anew when the last plan no longer closes the document; there the model
        may only continue or close what is open, or follow the plan, so the plan keeps fitting;
        force it once it fits with FORCE_SLACK to spare."""
        remaining = self.max_tokens - len(self.generated)
        zone = 2 * (self._close_len + FORCE_SLACK) + self._reserve()
        if remaining > zone and len(self.generated) % 8:
            return
        plan = self._plan_still_closing(remaining)
        if plan is None:
            last = self._ll.decode_bytes(self.generated[-1:])[-1:] or b'"'
            plan = self._closing_plan(remaining, self._matcher.deep_copy(), self._position, last)
        self._plan = tuple(plan or ())
        self._guard = None
        if plan is None:
            return  # cannot close within the budget: leave it to the model
        self._close_len = len(plan)
        if remaining <= len(plan) + FORCE_SLACK:
            self._closing, self.closed_by_budget = plan, True
        elif remaining <= 2 * (len(plan) + FORCE_SLACK) + self._reserve():
            self._guard = plan[0]

    def _plan_still_closing(self, limit: int) -> list[int] | None:
        """The last plan, if it still completes the document from here within ``limit`` tokens: the
        usual case while the model writes inside a string, where making a plan anew (a mask per
        token of it) was most of an extraction step's grammar work."""
        body = list(self._plan[:-1])
        if not body or len(body) > limit:
            return None
        matcher = self._matcher.deep_copy()
        return list(self._plan) if matcher.consume_tokens(body) and matcher.is_accepting() else None

    def _reserve(self) -> int:
        """Room kept for what one token may open before the zone is checked every step: the
        shortest whole document, a measure of the schema's biggest required structure."""
        return self._vocab.shortest.get(self._grammar) or 0

    def _closing_plan(self, limit: int, matcher: LLMatcher, position: _Position, last: bytes) -> list[int] | None:
        """Greedy completion from `matcher` (consumed), ending with EOS; None if over `limit`. `last`
        is the last byte written. In a string its pattern does not accept yet, the patterns'
        shortest completions are tried."""
        bitmask = allocate_token_bitmask(1, self._ll.vocab_size)
        plan: list[int] = []
        tried = -1  # where the open string's pattern completions were last tried
        while not matcher.is_accepting():
            if len(plan) >= limit:
                return None
            tokens = matcher.compute_ff_tokens()  # forced text, e.g. a required key
            if not tokens:
                fill_next_token_bitmask(matcher, bitmask)
                token = _preferred(bitmask, *self._vocab.closing[1 + _kind(last[0]) if position.inside else 0])
                tokens = [token]
                if (position.inside and self._patterns and (tried < 0 or len(plan) - tried >= 8)
                        and token is not None and not self._ll.decode_bytes([token]).startswith(b'"')):
                    tried = len(plan)
                    tokens = self._pattern_completion(matcher, position) or tokens
            if None in tokens or not matcher.consume_tokens(tokens):
                return None
            plan += tokens
            data = self._ll.decode_bytes(tokens)
            position, last = position.after(data), data[-1:] or last
            tried = tried if position.inside else -1
        return plan + [self._ll.eos_token]  # EOS may fall past the budget: the document is complete

    def _pattern_completion(self, matcher: LLMatcher, position: _Position) -> list[int] | None:
        """Tokens completing the open string for one of the schema's patterns: the shortest after
        which the grammar lets the string end."""
        text = position.string_so_far()
        if text is None:
            return None
        completions = sorted({c for p in self._patterns if (c := p.completion(text))}, key=len)
        quote = self._ll.tokenize_bytes(b'"')
        for completion in completions:
            tokens = self._ll.tokenize_bytes(json.dumps(completion, ensure_ascii=False)[1:-1].encode())
            if matcher.validate_tokens(tokens + quote) == len(tokens) + len(quote):
                return tokens
        return None


class JSONConstraint(GrammarConstraint):
    """GrammarConstraint for a JSON Schema (a dict or a Pydantic model class), checked first
    (SchemaError before any generation; BudgetError for a `max_tokens` below the schema's
    shortest complete document)."""

    kind = "JSON"

    def __init__(self, tokenizer: Any, schema: dict | type, *, vocab_size: int,
                 max_tokens: int | None = None) -> None:
        self.schema = check_schema(schema)
        super().__init__(tokenizer, build_grammar(self.schema), vocab_size=vocab_size, max_tokens=max_tokens,
                         patterns=schema_patterns(self.schema))
        minimum = self.minimal_tokens() if max_tokens is not None else None
        if minimum is not None and max_tokens < minimum:
            raise BudgetError(max_tokens, minimum)
