"""JSON-schema constrained decoding driven by a random "model" with the real LFM2 tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "lfm2-reference"
if not (REFERENCE / "LFM2-350M").is_dir():
    pytest.skip(f"{REFERENCE} is absent: the real LFM2 tokenizer lives beside the project in ../shared",
                allow_module_level=True)

from llguidance import LLMatcher  # noqa: E402
from mlx_lm.tokenizer_utils import TokenizerWrapper  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import lfm_mlx  # noqa: E402
from lfm_mlx import constrain  # noqa: E402
from lfm_mlx.constrain import (  # noqa: E402
    GrammarConstraint, JSONConstraint, SchemaError, build_grammar, check_schema, ll_tokenizer_for, schema_report,
    tool_call_grammar)
from lfm_mlx.tools import TOOL_CALL_END, TOOL_CALL_START, parse_tool_calls, tool_function  # noqa: E402
from keyword_schemas import NAME, SHARED_KEYWORD_SCHEMAS  # noqa: E402
from conftest import EOS  # noqa: E402

VOCAB = 65536  # the model's logits width; the tokenizer has 64,400 entries
TOKENIZER = AutoTokenizer.from_pretrained(REFERENCE / "LFM2-350M")
PROMPT = mx.array(TOKENIZER.encode("<|im_start|>user\nExtract the data.<|im_end|>\n<|im_start|>assistant\n"))

BOUNDED = {  # every string/array/number bounded, so a random model must finish on the grammar alone
    **SHARED_KEYWORD_SCHEMAS,
    "nested_objects": {"type": "object", "required": ["outer"], "properties": {"outer": {
        "type": "object", "required": ["inner"], "properties": {"inner": {
            "type": "object", "required": ["flag", "nothing"],
            "properties": {"flag": {"type": "boolean"}, "nothing": {"type": "null"}}}}}}},
    "integer_ranges": {"type": "object", "required": ["i", "j"], "properties": {
        "i": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3},
        "j": {"type": "integer", "minimum": 10, "maximum": 12}}},
    "ref_to_defs": {"type": "object", "required": ["a", "b"], "$defs": {"Item": {
        "type": "object", "required": ["n"], "properties": {"n": NAME}}},
        "properties": {"a": {"$ref": "#/$defs/Item"}, "b": {"type": "array", "maxItems": 2,
                                                         "items": {"$ref": "#/$defs/Item"}}}},
    "any_of_one_of": {"type": "object", "required": ["v", "w"], "properties": {
        "v": {"anyOf": [NAME, {"type": "null"}]},
        "w": {"oneOf": [{"type": "boolean"}, {"enum": [1, 2]}]}}},
    "prefix_items_format": {"type": "array", "prefixItems": [{"type": "string", "format": "date"},
                                                             {"type": ["boolean", "null"]}],
                            "items": False, "minItems": 2},
}
UNBOUNDED = {  # nothing bounded (a number's fraction never is): only the token budget can end it
    "type": "object", "required": ["title", "count", "score", "tags", "meta"], "properties": {
        "title": {"type": "string"}, "count": {"type": "integer"},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "meta": {"type": "object", "required": ["notes"], "properties": {
            "notes": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}}}


def decode(constraint, seed: int, temperature: float, max_steps: int) -> list[int]:
    """Random-logits "model": sample from the masked logits, feed the token back, until EOS."""
    mx.random.seed(seed)
    tokens, out = PROMPT, []
    for _ in range(max_steps):
        logits = constraint(tokens, mx.random.normal((1, VOCAB)))
        if temperature == 0:
            token = mx.argmax(logits, axis=-1).item()
        else:
            token = mx.random.categorical(logits / temperature).item()
        out.append(token)
        if token == EOS:
            break
        tokens = mx.concatenate([tokens, mx.array([token])])
    return out


def assert_valid_document(out: list[int], schema: dict, max_steps: int) -> dict:
    assert out[-1] == EOS and EOS not in out[:-1], f"no EOS within {max_steps}: {TOKENIZER.decode(out)!r}"
    assert len(out) <= max_steps
    document = json.loads(TOKENIZER.decode(out[:-1]))
    jsonschema.validate(document, schema)
    return document


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_random_model_writes_valid_json_and_stops_for_each_keyword(name):
    schema = BOUNDED[name]
    for seed in range(3):
        for temperature in (0.0, 1.0):
            out = decode(JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB), seed, temperature, 400)
            assert_valid_document(out, schema, 400)


def test_output_uses_json_dumps_separators_without_free_whitespace():
    schema = BOUNDED["ref_to_defs"]
    out = decode(JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB), 0, 0.0, 400)
    document = assert_valid_document(out, schema, 400)
    assert TOKENIZER.decode(out[:-1]) == json.dumps(document, ensure_ascii=False)


@pytest.mark.parametrize("budget", [40, 100])
def test_token_budget_forces_an_unbounded_document_closed(budget):
    for seed in range(3):
        for temperature in (0.0, 1.0):
            constraint = JSONConstraint(TOKENIZER, UNBOUNDED, vocab_size=VOCAB, max_tokens=budget)
            document = assert_valid_document(decode(constraint, seed, temperature, budget), UNBOUNDED, budget)
            assert len(document["meta"]["notes"]) >= 1
    # without the budget the same random model is still writing when the budget is spent
    out = decode(JSONConstraint(TOKENIZER, UNBOUNDED, vocab_size=VOCAB), 0, 0.0, budget)
    assert EOS not in out and len(out) == budget


def test_the_closing_plan_is_made_anew_only_when_the_last_one_no_longer_closes_the_document(monkeypatch):
    """Near the end of the budget the plan is checked every step; while the model writes inside a
    string the last plan still closes the document and is kept (checked by consuming it), instead of
    a mask per token of a new one. The budget still closes every document."""
    checks, made = [], []
    keep, plan = GrammarConstraint._plan_still_closing, GrammarConstraint._closing_plan

    def checked(self, limit):
        kept = keep(self, limit)
        if kept is not None:
            matcher = self._matcher.deep_copy()
            assert kept[-1] == EOS and len(kept) - 1 <= limit
            assert matcher.consume_tokens(kept[:-1]) and matcher.is_accepting()
        checks.append(kept is not None)
        return kept

    monkeypatch.setattr(GrammarConstraint, "_plan_still_closing", checked)
    monkeypatch.setattr(GrammarConstraint, "_closing_plan", lambda self, *a: made.append(1) or plan(self, *a))
    for seed in range(3):
        constraint = JSONConstraint(TOKENIZER, UNBOUNDED, vocab_size=VOCAB, max_tokens=100)
        assert_valid_document(decode(constraint, seed, 1.0, 100), UNBOUNDED, 100)
    assert len(checks) > 100 and sum(checks) > len(checks) / 2
    assert len(made) < len(checks) / 2


FORMATS_AND_PATTERN = {
    "type": "object",
    "properties": {
        "emails": {"type": "array", "items": {"type": "string", "format": "email"}},
        "links": {"type": "array", "items": {"type": "string", "format": "uri"}},
        "when": {"type": "array", "items": {"type": "string", "format": "date-time"}},
        "span": {"type": "string", "format": "duration"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"},
    },
    "required": ["emails", "span", "code"],
}


@pytest.mark.parametrize("budget", [48, 80, 160])
def test_token_budget_closes_strings_inside_formats_and_patterns(budget):
    """Forced closing must walk a format or pattern to its end (an e-mail needs its '@')."""
    for seed in range(4):
        for temperature in (0.0, 1.0):
            constraint = JSONConstraint(TOKENIZER, FORMATS_AND_PATTERN, vocab_size=VOCAB, max_tokens=budget)
            assert_valid_document(decode(constraint, seed, temperature, budget), FORMATS_AND_PATTERN, budget)


HARD_TO_CLOSE = {  # the closing planner once found no plan for these patterns; the last needs 200+ tokens
    "unanchored_pattern": {"type": "object", "required": ["id"],
                           "properties": {"id": {"type": "string", "pattern": "wpc-[0-9]+"}}},
    "image_reference": {"type": "object", "required": ["image"],
                        "properties": {"image": {"type": "string", "pattern": "(.+/)?.+:.+"}}},
    "key_pattern": {"type": "object", "minProperties": 1, "additionalProperties": False,
                    "patternProperties": {"^x-[a-z]+[0-9]$": {"type": "integer"}}},
    "thirty_required_strings": {"type": "object", "required": [f"field_{i}" for i in range(30)],
                                "properties": {f"field_{i}": {"type": "string"} for i in range(30)}},
    "unbounded": UNBOUNDED,
    "formats_and_pattern": FORMATS_AND_PATTERN,
}


@pytest.mark.parametrize("name", sorted(HARD_TO_CLOSE))
def test_any_budget_from_the_reported_minimum_ends_in_a_complete_document(name):
    schema = HARD_TO_CLOSE[name]
    minimum = JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=4096).minimal_tokens()
    for budget in (minimum, minimum + 1, minimum + 7, minimum + 40):
        for seed in range(3):
            for temperature in (0.0, 1.0):
                constraint = JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=budget)
                out = decode(constraint, seed, temperature, budget + 1)  # EOS may come after the budget
                assert_valid_document(out, schema, budget + 1)


def test_a_budget_below_the_minimum_is_refused_naming_the_minimum():
    schema = HARD_TO_CLOSE["thirty_required_strings"]
    minimum = JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=4096).minimal_tokens()
    assert 150 < minimum < 405  # every key, `": ""` and separator, with keys forced whole
    with pytest.raises(lfm_mlx.BudgetError, match=f"at least {minimum}$") as refused:
        JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=minimum - 1)
    assert refused.value.minimum == minimum
    JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=minimum)


def test_additional_properties_default_to_false_for_declared_properties():
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}}
    for seed in range(3):
        out = decode(JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB), seed, 1.0, 50)
        assert set(assert_valid_document(out, schema, 50)) <= {"a"}
    # ...but not when a required key is undeclared: it can only be an additional property
    check_schema({"type": "object", "properties": {"a": {}}, "required": ["b"]})


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    email: str | None = Field(default=None, max_length=20)
    pet: Cat | Dog = Field(discriminator="kind")


def test_pydantic_model_class_is_accepted():
    assert check_schema(Person) == Person.model_json_schema()
    kinds = set()
    for seed in range(4):
        out = decode(JSONConstraint(TOKENIZER, Person, vocab_size=VOCAB, max_tokens=80), seed, 1.0, 80)
        assert out[-1] == EOS
        person = Person.model_validate_json(TOKENIZER.decode(out[:-1]))
        assert 0 <= person.age <= 120
        kinds.add(person.pet.kind)
    assert kinds == {"cat", "dog"}


def accepts(schema: dict, document: str) -> bool:
    """Whether the schema's grammar lets the model write `document` (json.dumps layout) and then stop."""
    matcher = LLMatcher(ll_tokenizer_for(TOKENIZER), build_grammar(schema), log_level=0)
    return matcher.consume_tokens(TOKENIZER.encode(document, add_special_tokens=False)) and matcher.is_accepting()


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "object", "patternProperties": {"^n_": {"type": "integer"}}, "additionalProperties": False},
     '{"n_a": 1}', '{"n_a": "x"}'),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                {"type": "object", "required": ["a"]}]}, '{"a": 1}', '{}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "required": ["a", "b"], "minProperties": 2}, '{"a": 1, "b": 2}', '{"a": 1}'),
    ({"id": "http://example.com/s.json", "$schema": "http://json-schema.org/draft-04/schema#",
      "definitions": {"N": {"type": "integer"}}, "type": "object", "properties": {"n": {"$ref": "#/definitions/N"}},
      "required": ["n"]}, '{"n": 3}', '{"n": "3"}'),
    ({"$defs": {"T": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/T"}}}}},
      "$ref": "#/$defs/T"}, '{"kids": [{"kids": []}]}', '{"kids": [1]}'),
    ({"type": "object", "additionalProperties": {"type": "boolean"}}, '{"x": true}', '{"x": 1}'),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "x-kubernetes-group": "apps",
      "_format": "date", "self": {"vendor": "com.acme"}, "readonly": True, "example": {"a": "x"}},
     '{"a": "x"}', '{"a": 1}'),
])
def test_keywords_llguidance_can_enforce_are_enforced_and_unknown_ones_ignored(schema, good, bad):
    assert check_schema(schema) is schema and schema_report(schema).validated_after == ()
    assert accepts(schema, good) and not accepts(schema, bad)


@pytest.mark.parametrize("schema, left_out", [
    ({"type": "object", "properties": {"x": {"if": {"type": "string"}, "then": {"minLength": 2}}}}, ["if", "then"]),
    ({"type": "object", "not": {"required": ["a"]}}, ["not"]),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ["uniqueItems"]),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}}, ["dependentRequired"]),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, ["oneOf (as anyOf)"]),
    ({"type": "string", "format": "mongoId"}, ["format mongoId"]),
    ({"type": "string", "pattern": "^(?!admin).*$"}, ["pattern"]),  # a lookahead: not in llguidance's regexes
])
def test_what_the_grammar_cannot_enforce_is_accepted_and_reported(schema, left_out):
    report = schema_report(schema)
    assert list(report.validated_after) == left_out
    assert "Checked after generation" in report.summary() and all(k in report.summary() for k in left_out)


@pytest.mark.parametrize("schema, message", [
    ({"anyOf": [{"type": "null"}, {"$ref": "https://example.com/s.json"}]}, "https://example.com/s.json"),
    ({"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}, "/definitions/missing"),
])
def test_what_llguidance_cannot_compile_is_refused_in_one_line(schema, message):
    with pytest.raises(SchemaError, match=f"^schema rejected by llguidance: .*{re.escape(message)}") as error:
        check_schema(schema)
    assert "\n" not in str(error.value)


ENDLESS = [
    # a cycle of $refs with nothing between them, even where it is optional
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
     "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}},
    # recursion through a required property: every document would be infinite
    {"type": "object", "properties": {"a": {"$ref": "#/definitions/A"}}, "required": ["a"],
     "definitions": {"A": {"type": "object", "properties": {"next": {"$ref": "#/definitions/A"}},
                           "required": ["next"]}}},
    {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/A"},
     "$defs": {"A": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/A"}}}},
]


@pytest.mark.parametrize("schema", ENDLESS)
def test_definitions_no_finite_document_fits_are_refused_in_one_line(schema):
    with pytest.raises(SchemaError, match=r"^no finite document fits this schema: '#/(\$defs|definitions)/A' "):
        check_schema(schema)
    assert "\n" not in str(pytest.raises(SchemaError, check_schema, schema).value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"next": {"$ref": "#/$defs/A"}},
     "$defs": {"A": {"type": "object", "properties": {"next": {"$ref": "#/$defs/A"}}}}},
    {"type": "object", "properties": {"tree": {"$ref": "#/$defs/T"}}, "required": ["tree"],
     "$defs": {"T": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/T"}}]}}},
])
def test_recursion_with_a_way_out_is_accepted(schema):
    assert check_schema(schema) is schema


def test_schemas_too_big_or_too_deep_are_refused_before_llguidance_sees_them():
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(SchemaError, match="nests more than 64 levels"):
        check_schema(deep)
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 1000}
                                             for i in range(2100)}}
    with pytest.raises(SchemaError, match=r"the limit is 2,000,000$"):
        check_schema(huge)


@pytest.mark.parametrize("schema", [{"type": "strin"}, {"properties": 5}, {"required": "name"}])
def test_invalid_schema_is_rejected(schema):
    with pytest.raises(SchemaError, match="^invalid schema: "):
        check_schema(schema)


def test_llguidance_errors_become_schema_errors_before_generation():
    with pytest.raises(SchemaError, match="rejected by llguidance.*Missing"):
        JSONConstraint(TOKENIZER, {"$ref": "#/$defs/Missing"}, vocab_size=VOCAB)
    with pytest.raises(SchemaError, match="must be a dict or a Pydantic model class"):
        check_schema("{}")


def test_ll_tokenizer_is_built_once_per_tokenizer():
    ll = ll_tokenizer_for(TOKENIZER)
    assert ll_tokenizer_for(TokenizerWrapper(TOKENIZER)) is ll
    assert ll.vocab_size == len(TOKENIZER) == 64400 and ll.eos_token == EOS


def test_lfm25_tokenizer_works_too():
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE / "LFM2.5-1.2B-Base")
    schema = BOUNDED["enum_const"]
    constraint = JSONConstraint(tokenizer, schema, vocab_size=VOCAB, max_tokens=40)
    out = decode(constraint, 0, 1.0, 40)
    assert out[-1] == tokenizer.eos_token_id == EOS
    jsonschema.validate(json.loads(tokenizer.decode(out[:-1])), schema)


def masked(constraint, text: str) -> np.ndarray:
    """Feed `text` as generated tokens; return the masked logits of the next step as numpy."""
    constraint(PROMPT, mx.zeros((1, VOCAB)))
    tokens = mx.concatenate([PROMPT, mx.array(TOKENIZER.encode(text, add_special_tokens=False), mx.int32)])
    return np.array(constraint(tokens, mx.zeros((1, VOCAB))))[0]


@pytest.mark.parametrize("text", ['', '{"name": "Ad', '{"name": "Ada", "ok": ', '{"name": "Ada", "ok": tr'])
def test_cpu_bitmask_matches_the_matcher_token_by_token(monkeypatch, text):
    monkeypatch.setattr(constrain, "use_metal", lambda: False)
    schema = BOUNDED["object_required_no_extra"]
    allowed = np.flatnonzero(np.isfinite(masked(JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB), text)))
    assert allowed.size and allowed.max() < 64400  # ids past the tokenizer (64400..65535) never allowed
    matcher = LLMatcher(ll_tokenizer_for(TOKENIZER), build_grammar(schema), log_level=0)
    assert matcher.consume_tokens(TOKENIZER.encode(text, add_special_tokens=False))
    sample = np.union1d(np.random.default_rng(0).choice(64400, 4000, replace=False), allowed)
    brute = [t for t in sample.tolist() if t != EOS and matcher.validate_tokens([t]) == 1]
    assert sorted(set(allowed.tolist()) - {EOS}) == brute


def test_after_the_value_closes_only_eos_is_allowed():
    constraint = JSONConstraint(TOKENIZER, BOUNDED["object_required_no_extra"], vocab_size=VOCAB)
    assert not constraint.is_done
    assert np.flatnonzero(np.isfinite(masked(constraint, '{"name": "Ada", "ok": true}'))).tolist() == [EOS]
    assert constraint.is_done


def test_bitmask_is_padded_or_truncated_to_the_logits_width_and_keeps_dtype(monkeypatch):
    monkeypatch.setattr(constrain, "use_metal", lambda: False)
    bitmask = np.zeros((1, 2), np.int32)
    bitmask.view(np.uint32)[0] = [1 << 3, 1 << 31]  # ids 3 and 63
    wide = constrain.apply_bitmask(mx.ones((1, 100), mx.bfloat16), bitmask)
    assert wide.dtype == mx.bfloat16
    assert np.flatnonzero(np.isfinite(np.array(wide.astype(mx.float32))[0])).tolist() == [3, 63]
    narrow = constrain.apply_bitmask(mx.ones((1, 10)), bitmask)
    assert np.flatnonzero(np.isfinite(np.array(narrow)[0])).tolist() == [3]


def test_metal_path_is_chosen_only_when_metal_is_available():
    assert constrain.use_metal() == mx.metal.is_available()


def greedy_passes(constraint, seed: int, max_steps: int, fast_forward: bool) -> tuple[list[int], int]:
    """Constrained greedy decoding where the logits depend only on the position (so runs that take
    different numbers of passes see the same "model"); with `fast_forward`, forced tokens join the
    sampled one, as the engine feeds them. Returns the tokens and the passes taken."""
    tokens, out, passes = PROMPT, [], 0
    while len(out) < max_steps:
        logits = constraint(tokens, mx.random.normal((1, VOCAB), key=mx.random.key(seed * 100_003 + tokens.size)))
        passes += 1
        new = [mx.argmax(logits, axis=-1).item()]
        if new[0] == EOS:
            return out + new, passes
        if fast_forward:
            new += constraint.fast_forward(new[0], max_steps - len(out) - 2)
        out += new
        tokens = mx.concatenate([tokens, mx.array(new)])
    return out, passes


@pytest.mark.parametrize("name", ["thirty_required_strings", "unbounded", "formats_and_pattern", "key_pattern"])
def test_fast_forward_gives_the_token_by_token_output_in_fewer_passes(name):
    schema = HARD_TO_CLOSE[name]
    minimum = JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=4096).minimal_tokens()
    for seed in range(2):
        for budget in (None, minimum, minimum + 60):
            runs = [greedy_passes(JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=budget), seed, 400, ff)
                    for ff in (False, True)]
            (plain, plain_passes), (fast, fast_passes) = runs
            assert fast == plain and plain_passes == len(plain)
            assert fast_passes < plain_passes, TOKENIZER.decode(plain)
    with pytest.raises(RuntimeError, match="fast_forward"):
        JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB).fast_forward(5, 10)


def test_a_token_outside_the_grammar_raises():
    constraint = JSONConstraint(TOKENIZER, BOUNDED["object_required_no_extra"], vocab_size=VOCAB)
    constraint(PROMPT, mx.zeros((1, VOCAB)))
    bad = TOKENIZER.encode("hello", add_special_tokens=False)
    with pytest.raises(RuntimeError, match="broke the JSON constraint"):
        constraint(mx.concatenate([PROMPT, mx.array(bad)]), mx.zeros((1, VOCAB)))


def test_works_as_an_mlx_lm_logits_processor():
    from mlx_lm.generate import generate_step

    class RandomModel:
        def make_cache(self):
            return []

        def __call__(self, inputs, cache=None):
            return mx.random.normal((1, inputs.shape[1], VOCAB))

    mx.random.seed(3)
    constraint = JSONConstraint(TOKENIZER, UNBOUNDED, vocab_size=VOCAB, max_tokens=60)
    out = []
    for token, _ in generate_step(PROMPT, RandomModel(), max_tokens=60, logits_processors=[constraint],
                                  sampler=lambda logprobs: mx.random.categorical(logprobs)):
        out.append(token)
        if token == EOS:
            break
    assert_valid_document(out, UNBOUNDED, 60)


# --- any grammar, and tool calls -------------------------------------------------------------------

def test_any_llguidance_grammar_is_enforced():
    grammar = LLMatcher.grammar_from_lark('start: "yes" | "no" | "maybe " /[0-9]/')
    seen = set()
    for seed in range(6):
        out = decode(GrammarConstraint(TOKENIZER, grammar, vocab_size=VOCAB), seed, 1.0, 20)
        assert out[-1] == EOS
        seen.add(TOKENIZER.decode(out[:-1]))
    assert seen <= {"yes", "no"} | {f"maybe {d}" for d in range(10)} and len(seen) > 1


def test_a_grammar_the_tokenizer_cannot_serve_is_refused_before_generation():
    with pytest.raises(ValueError, match="unknown special token"):
        GrammarConstraint(TOKENIZER, 'start: <|no_such_token|> "x"', vocab_size=VOCAB)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": NAME, "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
SEARCH = {"name": "search", "parameters": {  # the bare form, a format and a nested object
    "type": "object", "required": ["query", "filters"], "properties": {
        "query": NAME, "limit": {"type": "integer", "minimum": 1, "maximum": 10},
        "filters": {"type": "object", "required": ["after"], "properties": {
            "after": {"type": "string", "format": "date"}, "exact": {"type": "boolean"}}}}}}
TAG = {"type": "function", "function": {"name": "tag_items", "parameters": {  # $defs, arrays, anyOf, all optional
    "type": "object", "$defs": {"Tag": {"type": "object", "required": ["name"], "properties": {
        "name": NAME, "weight": {"type": "integer", "minimum": 0, "maximum": 9}}}},
    "properties": {
        "ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1,
                "maxItems": 3},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "maxItems": 2},
        "note": {"anyOf": [NAME, {"type": "null"}]}, "dry_run": {"type": "boolean"}}}}}
PING = {"type": "function", "function": {"name": "ping", "description": "No parameters at all"}}
NOTE = {"name": "write_note", "parameters": {  # nothing bounded: only the token budget can end it
    "type": "object", "required": ["title", "body"], "properties": {
        "title": {"type": "string"}, "body": {"type": "string"}, "priority": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}}}}}
TOOLS = [WEATHER, SEARCH, TAG, PING]


def call_text(grammar: str, body: str) -> bool:
    """Does the grammar accept `<|tool_call_start|>body<|tool_call_end|>` as a whole reply?"""
    matcher = LLMatcher(ll_tokenizer_for(TOKENIZER), grammar, log_level=0)
    tokens = TOKENIZER.encode(f"{TOOL_CALL_START}{body}{TOOL_CALL_END}", add_special_tokens=False)
    return matcher.consume_tokens(tokens) and matcher.is_accepting()


@pytest.mark.parametrize("body", [
    '[get_weather(city="Paris")]',
    '[get_weather(city="Paris", unit="celsius")]',
    '[get_weather(city="Paris", days=3, unit="fahrenheit")]',
    '[search(query="mlx", filters={"after": "2024-01-31"})]',
    '[search(query="mlx", limit=2, filters={"after": "2024-01-31", "exact": true})]',
    '[tag_items()]',
    '[tag_items(note=null)]',
    '[tag_items(ids=[1, 2], tags=[{"name": "a", "weight": 5}], dry_run=false)]',
    '[ping()]',
    '[ping(), get_weather(city="Oslo"), ping()]',
])
def test_tool_grammar_accepts_calls_with_valid_arguments_in_order(body):
    assert call_text(tool_call_grammar(TOOLS), body)


@pytest.mark.parametrize("body", [
    '[]',  # "required": at least one call
    '[get_weather()]',  # a required argument missing
    '[get_weather(days=3)]',
    '[get_weather(days=3, city="Paris")]',  # out of the properties' order
    '[get_weather(city="Paris", wind=3)]',  # not a parameter
    '[get_weather(city="Paris", days=9)]',  # outside the parameter's schema
    '[get_weather(city="Paris", unit="kelvin")]',
    '[get_weather(city="Paris", days=1.5)]',
    "[get_weather(city='Paris')]",  # Python quotes are not JSON
    '[get_weather(city="Paris", days=3)',
    '[get_weather(city= "Paris")]',  # free whitespace
    '[get_weather( city="Paris")]',
    '[ping(),ping()]',
    '[search(query="mlx", filters={"after":"2024-01-31"})]',
    '[search(query="mlx", filters={"after": "yesterday"})]',
    '[search(query="mlx", filters={"after": "2024-01-31", "extra": 1})]',
    '[tag_items(ids=[])]',
    '[unknown()]',
    'ping()',  # the list brackets are part of the syntax
])
def test_tool_grammar_rejects_anything_else(body):
    assert not call_text(tool_call_grammar(TOOLS), body)


def test_named_tool_grammar_allows_exactly_one_call_to_that_tool():
    grammar = tool_call_grammar(TOOLS, "get_weather")
    assert call_text(grammar, '[get_weather(city="Paris")]')
    assert not call_text(grammar, '[ping()]')
    assert not call_text(grammar, '[get_weather(city="Paris"), get_weather(city="Oslo")]')


def test_after_the_tool_call_only_eos_is_allowed():
    constraint = GrammarConstraint(TOKENIZER, tool_call_grammar(TOOLS), vocab_size=VOCAB)
    allowed = masked(constraint, f"{TOOL_CALL_START}[ping(), ping()]{TOOL_CALL_END}")
    assert np.flatnonzero(np.isfinite(allowed)).tolist() == [EOS]
    assert constraint.is_done


def test_tool_grammar_starts_with_the_tool_call_token():
    constraint = GrammarConstraint(TOKENIZER, tool_call_grammar(TOOLS), vocab_size=VOCAB)
    allowed = masked(constraint, "")
    assert np.flatnonzero(np.isfinite(allowed)).tolist() == TOKENIZER.convert_tokens_to_ids([TOOL_CALL_START])


def with_parameters(parameters: dict, name: str = "f") -> list[dict]:
    return [{"type": "function", "function": {"name": name, "parameters": parameters}}]


@pytest.mark.parametrize("tools, name, error", [
    (with_parameters({"type": "object"}, "get-weather"), None, "tool name 'get-weather' is not a Python identifier"),
    (with_parameters({"type": "object"}, "math.sqrt"), None, "tool name 'math.sqrt' is not a Python identifier"),
    (with_parameters({"type": "object"}, "class"), None, "tool name 'class' is not a Python identifier"),
    ([{"description": "no name"}], None, "tool name None is not a Python identifier"),
    (with_parameters({"type": "object", "properties": {"from": {}}}), None,
     "parameter name of tool 'f': 'from' is not a Python identifier"),
    (with_parameters({"type": "object", "properties": {"max tokens": {}}}), None,
     "parameter name of tool 'f': 'max tokens' is not a Python identifier"),
    (with_parameters({"type": "string"}), None, "parameters of tool 'f' must be an object schema"),
    (with_parameters({"properties": {"a": {}}}), None, "parameters of tool 'f' must be an object schema"),
    (with_parameters({"type": "object", "minProperties": 1}), None,
     r"unsupported schema keyword 'minProperties' at \$\.f\.parameters$"),
    (with_parameters({"type": "object", "properties": {"a": {"not": {}}}}), None,
     r'tool grammar rejected by llguidance: .*Unimplemented keys: \["not"\]'),
    (with_parameters({"type": "object", "properties": {"a": {"type": "strin"}}}), None,
     "invalid parameters of tool 'f': "),
    (with_parameters({"type": "object", "properties": {}, "required": ["a"]}), None,
     r"required parameters \['a'\] of tool 'f' are not in its properties"),
    (with_parameters({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}), None,
     "tool grammar rejected by llguidance"),
    (TOOLS + [PING], None, "tool names must be unique"),
    (TOOLS, "get_time", "tool 'get_time' is not among the tools"),
    ([], None, "needs at least one tool"),
])
def test_tools_that_cannot_be_enforced_are_refused_with_the_reason(tools, name, error):
    with pytest.raises(ValueError, match=error):
        tool_call_grammar(tools, name)


def generate_reply(tiny, tools: list[dict], constraint, seed: int, temperature: float, max_steps: int) -> list[int]:
    """Token by token through the tiny random-weight model, its cache and the constraint, until EOS."""
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "What is the weather in Paris? Then ping."}]
    tokens = mx.array(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
    cache, step, out = lfm_mlx.make_cache(model), tokens, []
    mx.random.seed(seed)
    for _ in range(max_steps):
        logits = constraint(tokens, model(step[None], cache)[:, -1])
        token = (mx.argmax(logits, axis=-1) if temperature == 0 else mx.random.categorical(logits / temperature)).item()
        out.append(token)
        if token == EOS:
            break
        step = mx.array([token])
        tokens = mx.concatenate([tokens, step])
    return out


def assert_valid_calls(tiny, tools: list[dict], out: list[int], max_steps: int) -> list[dict]:
    """The reply is one tool-call span, then EOS; every call names a tool and its arguments validate."""
    assert out[-1] == EOS and EOS not in out[:-1], f"no EOS within {max_steps}: {tiny[1].decode(out)!r}"
    assert len(out) <= max_steps
    text = tiny[1].decode(out[:-1])
    assert text.startswith(TOOL_CALL_START) and text.endswith(TOOL_CALL_END) and text.count(TOOL_CALL_END) == 1
    calls = parse_tool_calls(text)
    assert calls, text
    functions = {f["name"]: f for f in map(tool_function, tools)}
    for call in calls:
        assert "error" not in call, call
        parameters = functions[call["name"]].get("parameters", {"type": "object", "properties": {}})
        jsonschema.validate(call["arguments"], parameters)
        assert set(call["arguments"]) <= parameters.get("properties", {}).keys()
    return calls


@pytest.mark.parametrize("tool", TOOLS, ids=lambda tool: tool_function(tool)["name"])
def test_random_model_calls_the_named_tool_with_valid_arguments(tiny, tool):
    name = tool_function(tool)["name"]
    for seed in range(3):
        for temperature in (0.0, 1.0):
            constraint = GrammarConstraint(tiny[1], tool_call_grammar(TOOLS, name), vocab_size=VOCAB)
            calls = assert_valid_calls(tiny, TOOLS, generate_reply(tiny, TOOLS, constraint, seed, temperature, 200), 200)
            assert [call["name"] for call in calls] == [name]


def test_random_model_makes_valid_calls_when_a_call_is_required(tiny):
    names = set()
    for seed in range(4):
        for temperature in (0.0, 1.0):
            constraint = GrammarConstraint(tiny[1], tool_call_grammar(TOOLS), vocab_size=VOCAB, max_tokens=120)
            calls = assert_valid_calls(tiny, TOOLS, generate_reply(tiny, TOOLS, constraint, seed, temperature, 120), 120)
            names |= {call["name"] for call in calls}
    assert len(names) > 1


@pytest.mark.parametrize("budget", [24, 64])
@pytest.mark.parametrize("name", ["write_note", None])
def test_token_budget_forces_a_tool_call_closed(tiny, budget, name):
    tools = [NOTE, WEATHER]
    for seed in range(3):
        for temperature in (0.0, 1.0):
            grammar = tool_call_grammar(tools, name)
            constraint = GrammarConstraint(tiny[1], grammar, vocab_size=VOCAB, max_tokens=budget)
            calls = assert_valid_calls(tiny, tools, generate_reply(tiny, tools, constraint, seed, temperature, budget),
                                       budget)
            if name:
                assert [call["name"] for call in calls] == [name]
    # without the budget the same model is still writing when the budget is spent
    constraint = GrammarConstraint(tiny[1], tool_call_grammar([NOTE]), vocab_size=VOCAB)
    out = generate_reply(tiny, [NOTE], constraint, 0, 0.0, budget)
    assert EOS not in out and len(out) == budget


@pytest.mark.parametrize("density", [0.0, 1e-4, 0.01, 0.5])
def test_the_closing_planner_picks_the_allowed_token_of_lowest_rank(density):
    rng = np.random.default_rng(int(density * 1e4))
    rank = rng.permutation(VOCAB)
    best = np.argsort(rank)[:8]
    for _ in range(20):
        allowed = np.flatnonzero(rng.random(VOCAB) < density)
        bitmask = np.zeros((1, VOCAB // 32), np.int32)
        np.bitwise_or.at(bitmask.view(np.uint32)[0], allowed >> 5, (1 << (allowed & 31)).astype(np.uint32))
        expected = int(allowed[np.argmin(rank[allowed])]) if allowed.size else None
        assert constrain._preferred(bitmask, rank, best) == expected
