"""JSON-schema constrained decoding driven by a random "model" with the real LFM2 tokenizer."""

from __future__ import annotations

import json
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

from lfm_mlx import constrain  # noqa: E402
from lfm_mlx.constrain import (  # noqa: E402
    JSONConstraint, SchemaError, build_grammar, check_schema, ll_tokenizer_for)
from keyword_schemas import NAME, SHARED_KEYWORD_SCHEMAS  # noqa: E402

VOCAB = 65536  # the model's logits width; the tokenizer has 64,400 entries
EOS = 7
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


def decode(constraint, seed: int, temperature: float, max_steps: int, prepare: bool = False) -> list[int]:
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
        if prepare:
            constraint.prepare(token)
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


@pytest.mark.parametrize("schema, keyword, path", [
    ({"type": "object", "properties": {"x": {"if": {"type": "string"}, "then": {}}}}, "if", "$.properties.x"),
    ({"not": {"type": "null"}}, "not", "$"),
    ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patternProperties", "$"),
    ({"type": "array", "items": {"type": "array", "uniqueItems": True}}, "uniqueItems", "$.items"),
    ({"anyOf": [{"type": "null"}, {"$ref": "https://example.com/s.json"}]}, "$ref", "$.anyOf[1]"),
    ({"$defs": {"D": {"type": "string", "format": "iri"}}, "$ref": "#/$defs/D"}, "format", "$.$defs.D"),
])
def test_unsupported_keyword_is_named_with_its_path(schema, keyword, path):
    with pytest.raises(SchemaError) as error:
        check_schema(schema)
    assert f"unsupported schema keyword {keyword!r}" in str(error.value)
    assert str(error.value).endswith(f"at {path}")


def test_unsupported_keyword_message_format():
    with pytest.raises(SchemaError, match=r"^unsupported schema keyword 'if' at \$\.properties\.x$"):
        check_schema({"type": "object", "properties": {"x": {"if": {}}}})


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


def test_prepare_computes_the_same_masks_in_the_background():
    schema = BOUNDED["ref_to_defs"]
    plain = decode(JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=80), 2, 1.0, 80)
    constraint = JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB, max_tokens=80)
    assert decode(constraint, 2, 1.0, 80, prepare=True) == plain
    assert constraint.stats.count == len(plain) and constraint.stats.seconds > 0
    with pytest.raises(RuntimeError, match="prepare"):
        JSONConstraint(TOKENIZER, schema, vocab_size=VOCAB).prepare(5)


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
