"""Extraction: schema-valid JSON from random-weight models, grounding, chunking, batches and the CLI."""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from conftest import forcing, require_shared
from lfm_mlx.constrain import BudgetError, JSONConstraint, SchemaError, schema_report
from lfm_mlx.engine import Cancelled, Engine, Request
from lfm_mlx.sample import SamplingSettings
from lfm_mlx.extract import (
    DESCRIPTION_CHARS, SCHEMA_PROMPT_CHARS, SCHEMAS_DIR, SYSTEM_PROMPT, Extraction, build_messages, extract,
    _parse, extract_many, main, merge, merge_all, schema_for_prompt, split_text)
from lfm_mlx.grounding import ground, string_leaves
from keyword_schemas import NAME, SHARED_KEYWORD_SCHEMAS

extract_module = importlib.import_module("lfm_mlx.extract")  # `lfm_mlx.extract` may name the function

PRESETS = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(SCHEMAS_DIR.glob("*.json"))}
SAMPLES = {name: (SCHEMAS_DIR / f"{name}.txt").read_text(encoding="utf-8") for name in PRESETS}

KEYWORD_SCHEMAS = {  # together with the presets, every keyword in ENFORCED and VALIDATED_AFTER
    **SHARED_KEYWORD_SCHEMAS,
    "all_of_pattern_properties": {"allOf": [
        {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}}},
        {"type": "object", "patternProperties": {"^x_": {"type": "boolean"}}, "minProperties": 1, "maxProperties": 3}]},
    "validated_after": {  # what the grammar cannot enforce: checked after generation, sampled again if broken
        "type": "object", "required": ["tags", "n"], "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3,
                     "uniqueItems": True},
            "n": {"type": "integer", "minimum": 0, "maximum": 9, "not": {"const": 4}}}},
    "additional_properties_schema": {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}},
                                     "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}},
    "number_ranges": {"type": "object", "required": ["i", "x"], "properties": {
        "i": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3},
        "x": {"type": "number", "minimum": 0.5, "maximum": 2}}},
    "refs_defs_definitions": {
        "type": "object", "required": ["a", "b"],
        "$defs": {"Item": {"type": "object", "required": ["n"], "properties": {"n": NAME}}},
        "definitions": {"Tag": {"type": "string", "maxLength": 8}},
        "properties": {"a": {"$ref": "#/$defs/Item"},
                       "b": {"type": "array", "maxItems": 2, "items": {"$ref": "#/definitions/Tag"}}}},
    "any_of_one_of": {"type": "object", "required": ["v", "w"], "properties": {
        "v": {"anyOf": [NAME, {"type": "null"}]}, "w": {"oneOf": [{"type": "boolean"}, {"enum": [1, 2]}]}}},
    "prefix_items_formats": {"type": "array", "items": False, "minItems": 3, "prefixItems": [
        {"type": "string", "format": "date"}, {"type": "string", "format": "email"}, {"type": ["boolean", "null"]}]},
    "annotations_discriminator": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://example.com/pet.json",
        "$comment": "annotations only", "title": "Pet", "description": "A pet", "type": "object",
        "required": ["pet"], "properties": {
            "pet": {"discriminator": {"propertyName": "kind"}, "oneOf": [
                {"type": "object", "required": ["kind", "lives"], "properties": {
                    "kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 0, "maximum": 9}}},
                {"type": "object", "required": ["kind", "good"], "properties": {
                    "kind": {"const": "dog"}, "good": {"type": "boolean"}}}]},
            "nickname": {"type": "string", "maxLength": 10, "default": "none", "examples": ["Rex"],
                         "deprecated": True, "readOnly": True},
            "secret": {"type": "string", "maxLength": 10, "writeOnly": True}}},
    "unbounded": {  # nothing bounded: only the token budget can end it
        "type": "object", "required": ["title", "count", "score", "tags", "meta"], "properties": {
            "title": {"type": "string"}, "count": {"type": "integer"},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object", "required": ["notes"], "properties": {
                "notes": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}}},
}


# The keywords extraction is tested with: the grammar enforces the first set, validation checks the second.
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
            "enum", "const", "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
            "exclusiveMaximum", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "format",
            "patternProperties", "minProperties", "maxProperties"}
VALIDATED_AFTER = {"uniqueItems", "not"}


def test_schemas_under_test_cover_every_keyword_family():
    reports = [schema_report(s) for s in [*PRESETS.values(), *KEYWORD_SCHEMAS.values()]]
    assert ENFORCED <= set().union(*(r.enforced for r in reports))
    assert VALIDATED_AFTER <= set().union(*(r.validated_after for r in reports))


# --- ready schemas ----------------------------------------------------------------------------------

# What a perfect extraction of each sample text says: for grounding, to prove the schemas fit, and for
# the extraction benchmark to replay.
EXPECTED = {p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((SCHEMAS_DIR.parent / "expected").glob("*.json"))}
NOT_IN_TEXT = {"mixed", "mobile", "work", "high", "hybrid", "full-time", "year", "2024-03-12", "2024-04-11",
               "2024-06-06", "2024-09-03", "2024-09-13", "2024-09-24", "2024-11-30"}


def test_presets_are_documented_supported_schemas_that_fit_their_sample():
    assert set(PRESETS) == {"contact_card", "invoice", "calendar_event", "product_review",
                            "meeting_action_items", "job_posting"}
    for name, schema in PRESETS.items():
        assert schema["title"] and schema["description"] and SAMPLES[name].strip()
        extract_module.check_schema(schema)
        jsonschema.validate(EXPECTED[name], schema)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_value_of_a_perfect_extraction_is_grounded_in_the_sample(name):
    text, spans = SAMPLES[name], ground(EXPECTED[name], SAMPLES[name])
    for path, value in string_leaves(EXPECTED[name]):
        if value in NOT_IN_TEXT:
            continue
        assert spans[path] is not None, (path, value)
        start, end = spans[path]
        assert " ".join(text[start:end].split()).casefold() == value.casefold()


# --- grounding ----------------------------------------------------------------------------------------

# --- the extraction prompt ----------------------------------------------------------------------------

def test_prompt_states_task_schema_instructions_and_examples_as_turns():
    schema = PRESETS["contact_card"]
    example = ("Call Bo on 555 0100.", {"name": "Bo", "phones": [{"number": "555 0100"}]})
    messages = build_messages(schema, instructions="Names without titles.", examples=[example])
    system = messages[0]["content"]
    assert messages[0]["role"] == "system" and system.startswith(SYSTEM_PROMPT + "\nNames without titles.\n\n")
    assert system.endswith("Schema:\n" + json.dumps(schema, ensure_ascii=False))
    assert messages[1:] == [{"role": "user", "content": example[0]},
                            {"role": "assistant", "content": json.dumps(example[1])}]


def test_a_large_schema_is_compacted_in_the_prompt_and_still_enforced_whole(tiny):
    described = {"type": "string", "maxLength": 20, "description": "A long explanation. " * 40,
                 "examples": ["x"], "default": "none"}
    schema = {"type": "object", "title": "Big", "required": ["p0"],
              "properties": {"p0": {"$ref": "#/$defs/Used"}, **{f"p{i}": described for i in range(1, 40)}},
              "$defs": {"Used": {"type": "integer", "minimum": 0, "maximum": 9, "description": "kept"},
                        "Unused": described}}
    assert len(json.dumps(schema)) > SCHEMA_PROMPT_CHARS
    shown_text = schema_for_prompt(schema)
    shown = json.loads(shown_text)
    assert len(shown_text) <= SCHEMA_PROMPT_CHARS
    assert list(shown["properties"]) == list(schema["properties"]) and shown["required"] == ["p0"]
    assert shown["$defs"] == {"Used": schema["$defs"]["Used"]} and "title" not in shown
    short = described["description"][:DESCRIPTION_CHARS].rstrip() + "…"
    assert all(p == {"type": "string", "maxLength": 20, "description": short}
               for name, p in shown["properties"].items() if name != "p0")
    small = PRESETS["contact_card"]
    assert schema_for_prompt(small) == json.dumps(small, ensure_ascii=False)
    model, tok = tiny
    result = extract(model, tok, "p0 is 7.", schema, max_tokens=96)
    assert result.valid, result.error
    jsonschema.validate(result.data, schema)


def test_real_world_schemas_fit_the_prompt_compacted():
    """The dev set's 150 KB Kubernetes schema shows in under the budget; none stays over 48k characters."""
    files = sorted((require_shared().parent / "schemas-dev").glob("*/*.json"))
    sizes = {f.name: len(schema_for_prompt(json.loads(f.read_text(encoding="utf-8")))) for f in files}
    assert len(sizes) > 200 and max(sizes.values()) < 48_000
    assert sizes["kb_805_Normalized.json"] <= SCHEMA_PROMPT_CHARS


def test_a_schema_leaving_no_room_for_the_document_is_refused_naming_the_sizes(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(model.args, "max_position_embeddings", 700)
    with pytest.raises(SchemaError, match=r"take \d+ prompt tokens and the reply up to 512, leaving 0 of the "
                                          r"700-token context for the document \(at least 256 needed\)"):
        extract(model, tok, "text", PRESETS["contact_card"], max_tokens=512)
    assert extract(model, tok, "Bo", PRESETS["contact_card"], max_tokens=48).valid


def test_bad_schema_or_examples_fail_before_any_generation(tiny):
    _, tok = tiny
    model = None  # generating would fail on it: the error must come first
    with pytest.raises(SchemaError, match=r"no finite document fits this schema"):
        extract(model, tok, "text", {"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"})
    with pytest.raises(SchemaError, match="invalid schema"):
        extract_many(model, tok, ["text"], {"type": "strin"})
    with pytest.raises(ValueError, match=r"examples\[0\] does not match the schema: 5 is not of type 'string'"):
        extract(model, tok, "text", PRESETS["contact_card"], examples=[("Bo", {"name": 5})])


# --- validity from random models ----------------------------------------------------------------------

ALL_SCHEMAS = {**{f"preset:{k}": v for k, v in PRESETS.items()}, **KEYWORD_SCHEMAS}


def assert_valid(results: list[Extraction], schema: dict, max_tokens: int) -> None:
    """Each chunk's output (one line of `raw` each) parses, validates and ended within its budget."""
    for r in results:
        assert r.valid and r.error is None, (r.error, r.raw)
        jsonschema.validate(r.data, schema)
        lines = r.raw.split("\n")
        assert len(lines) == r.chunks
        for line in lines:
            jsonschema.validate(json.loads(line), schema)
        assert 0 < r.stats.generation_tokens <= max_tokens * r.chunks and r.stats.prompt_tokens > 0
        assert r.stats.mask_ms_per_token > 0


@pytest.mark.parametrize("seed, name", enumerate(sorted(ALL_SCHEMAS)))
def test_random_tiny_model_output_always_validates(tiny, seed, name):
    """Three documents (so greedy decoding differs) at temperature 0, and at 0.7 with a seed per schema."""
    model, tok = tiny
    schema = ALL_SCHEMAS[name]
    texts = [SAMPLES[k] for k in ("invoice", "product_review", "meeting_action_items")]
    max_tokens = 64 if name.startswith("preset:") else 40
    for temperature in (0.0, 0.7):
        results = extract_many(model, tok, texts, schema, max_tokens=max_tokens, temperature=temperature,
                               seed=seed, progress=False)
        assert_valid(results, schema, max_tokens)


@pytest.fixture(scope="module")
def model_350m(checkpoint_350m):
    require_shared()
    import lfm_mlx

    return lfm_mlx.load(checkpoint_350m, dtype="float32")


@pytest.mark.parametrize("name, temperature", [("contact_card", 0.0), ("meeting_action_items", 0.7)])
def test_random_350m_shape_output_always_validates(model_350m, name, temperature):
    """An e-mail format, greedy; a required array of objects, sampled."""
    model, tok = model_350m
    result = extract(model, tok, SAMPLES[name], PRESETS[name], max_tokens=32, temperature=temperature, seed=0)
    assert_valid([result], PRESETS[name], 32)


def test_progress_counts_every_token_and_an_early_close_is_reported(tiny):
    """on_tokens adds up to the tokens generated; a budget too small for the model's own ending is
    closed by the grammar and says so, a roomy one does not."""
    model, tok = tiny
    schema = {"type": "object", "properties": {"notes": {"type": "string"}}, "required": ["notes"]}
    counts: list[int] = []
    tight = extract(model, tok, "Some notes.", schema, max_tokens=24, on_tokens=counts.append)
    assert tight.valid and tight.closed_by_budget
    assert sum(counts) == tight.stats.generation_tokens and all(n > 0 for n in counts)
    bounded = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    roomy = extract(model, tok, "Some notes.", bounded, max_tokens=256)
    assert roomy.valid and not roomy.closed_by_budget


def test_pydantic_model_class_as_schema(tiny):
    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int = Field(ge=0, le=9)

    class Owner(BaseModel):
        name: str = Field(max_length=20)
        pets: list[Cat] = Field(max_length=2)

    model, tok = tiny
    result = extract(model, tok, "Ada has a cat with 9 lives.", Owner, max_tokens=48, temperature=0.7, seed=3)
    assert result.valid
    assert Owner.model_validate(result.data).name == result.data["name"]


# --- scripted replies: known values through the real engine -------------------------------------------

@pytest.fixture
def scripted(tiny, monkeypatch):
    """Make the tiny model reply `reply(document)` by forcing its tokens; the JSON grammar still runs."""
    model, tok = tiny
    real = extract_module._requests
    prompts: list[str] = []

    def install(reply):
        def requests(model, tokenizer, prompt_ids, schema, **options):
            for request in real(model, tokenizer, prompt_ids, schema, **options):
                text = tok.decode(request.prompt)
                document = text[text.rindex("<|im_start|>user\n") + len("<|im_start|>user\n"):text.rindex("<|im_end|>")]
                prompts.append(document)
                ids = tok.encode(json.dumps(reply(document), ensure_ascii=False), add_special_tokens=False)
                request.logits_processors.append(forcing(ids))  # after the grammar, which still runs
                yield request

        monkeypatch.setattr(extract_module, "_requests", requests)
        return prompts

    return install


def test_spans_of_a_known_extraction_point_at_the_values(tiny, scripted):
    model, tok = tiny
    name = "invoice"
    scripted(lambda document: EXPECTED[name])
    result = extract(model, tok, SAMPLES[name], PRESETS[name])
    assert result.valid and result.data == EXPECTED[name] and not result.chunked and result.chunks == 1
    text = SAMPLES[name]
    assert result.spans["$.buyer.name"] == (text.index("Maria Santos"), text.index("Maria Santos") + 12)
    assert result.spans["$.seller.name"] == (0, len("NORTHWIND TRADERS LDA"))  # case-insensitive
    item = result.spans["$.line_items[1].description"]
    assert text[item[0]:item[1]] == "Black ink cartridge"
    assert result.spans["$.issue_date"] is None  # "2024-03-12" is written "12 March 2024"
    assert json.loads(json.dumps(result.to_dict()))["spans"]["$.buyer.name"] == list(result.spans["$.buyer.name"])


PEOPLE = ["Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiroshi", "Ingrid", "Jamal",
          "Kofi", "Leila"]
PEOPLE_SCHEMA = {"type": "object", "required": ["project", "people"], "properties": {
    "project": {"type": "string"}, "people": {"type": "array", "items": {"type": "string"}}}}


def long_document() -> str:
    sentences = [f"{p} reviewed the quarterly numbers with the finance team and wrote a short note." for p in PEOPLE]
    sentences[5] += " This was for Project Falcon."
    sentences[11] += " Next up is Project Heron."
    return "\n\n".join(" ".join(sentences[i:i + 2]) for i in range(0, len(sentences), 2))


def people_in(document: str) -> dict:
    project = re.search(r"Project \w+", document)
    return {"project": project.group(0) if project else "", "people": [p for p in PEOPLE if p in document]}


def test_document_three_times_the_budget_is_chunked_and_merged(tiny, scripted):
    model, tok = tiny
    text, budget = long_document(), 60
    assert len(tok.encode(text, add_special_tokens=False)) >= 3 * budget
    chunks = scripted(people_in)
    result = extract(model, tok, text, PEOPLE_SCHEMA, context_budget=budget)
    assert result.chunked and result.chunks == len(chunks) >= 3
    assert all(chunk.strip() and chunk in text for chunk in chunks)
    assert sum(len(people_in(c)["people"]) for c in chunks) > len(PEOPLE)  # chunks overlap...
    assert result.data == {"project": "Project Falcon", "people": PEOPLE}  # ...and duplicates are dropped
    assert result.valid and result.raw.count("\n") == result.chunks - 1
    assert result.spans["$.project"] == (text.index("Project Falcon"), text.index("Project Falcon") + 14)
    assert result.spans["$.people[3]"] == (text.index("Dmitri"), text.index("Dmitri") + 6)


def test_random_model_on_a_long_document_still_validates(tiny):
    model, tok = tiny
    result = extract(model, tok, long_document(), PRESETS["meeting_action_items"], context_budget=60,
                     max_tokens=40, temperature=0.7, seed=1)
    assert result.chunked and result.chunks >= 3
    assert_valid([result], PRESETS["meeting_action_items"], 40)


def test_split_text_keeps_sentences_whole_fits_the_budget_and_overlaps(tiny):
    _, tok = tiny

    def count(s):
        return len(tok.encode(s, add_special_tokens=False))

    text = long_document()
    ranges = split_text(text, count, 60)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(text)
    for (s1, e1), (s2, e2) in zip(ranges, ranges[1:]):
        assert s1 < s2 < e1 <= e2  # consecutive chunks overlap and move forward
    for s, e in ranges:
        assert count(text[s:e]) <= 60 + 2  # pieces counted apart can merge a token or two differently
        assert s == 0 or text[s - 1].isspace() and text[s - 2] in ".\n"
    assert split_text("short", count, 60) == [(0, 5)]
    unbroken = "x" * 2000  # no boundary at all: halved until it fits
    pieces = split_text(unbroken, count, 50)
    assert len(pieces) > 1 and all(count(unbroken[s:e]) <= 50 for s, e in pieces)


def test_merge_concatenates_arrays_without_duplicates_and_keeps_first_scalars():
    schema = {"type": "object", "properties": {
        "title": {"type": "string"}, "n": {"type": ["integer", "null"]},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string"}},
        "who": {"$ref": "#/$defs/W"}}, "$defs": {"W": {"type": "object", "properties": {
            "names": {"type": "array", "items": {"type": "string"}}, "city": {"type": "string"}}}}}
    first = {"title": "", "n": None, "tags": ["a"], "who": {"names": ["x"], "city": "Rome"}}
    later = {"title": "T", "n": 2, "tags": ["a", "b", "c", "d"], "who": {"names": ["x", "y"], "city": "Oslo"}, "new": 1}
    assert merge(first, later, schema) == {
        "title": "T", "n": 2, "tags": ["a", "b", "c"], "who": {"names": ["x", "y"], "city": "Rome"}, "new": 1}
    either = {"anyOf": [
        {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"type": "object", "required": ["b"], "properties": {"b": {"type": "integer"}}, "additionalProperties": False}]}
    assert merge_all([{"a": 1}, {"b": 2}, {"a": 3}], either) == {"a": 1}  # {"a", "b"} fits neither branch


# --- batches ------------------------------------------------------------------------------------------

def test_extract_many_keeps_order_reports_bad_texts_and_matches_single_extraction(tiny):
    model, tok = tiny
    schema = KEYWORD_SCHEMAS["refs_defs_definitions"]
    texts = [SAMPLES["product_review"], 42, SAMPLES["contact_card"], "", long_document()]
    options = dict(max_tokens=40, context_budget=120)
    results = extract_many(model, tok, texts, schema, **options, batch_size=3, progress=False)
    assert len(results) == len(texts)
    assert not results[1].valid and results[1].error == "text must be a string, not int" and results[1].chunks == 0
    assert not results[3].valid and results[3].error == "the text is empty: there is nothing to extract"
    assert [r.chunked for r in results] == [False, False, False, False, True]
    for text, result in zip(texts, results):
        if isinstance(text, str) and text:
            single = extract(model, tok, text, schema, **options)
            assert result.valid and result.raw == single.raw and result.chunks == single.chunks


def test_empty_and_lone_surrogate_texts_fail_alone_in_extract_many_and_raise_in_extract(tiny):
    model, tok = tiny
    schema = KEYWORD_SCHEMAS["enum_const"]
    texts = ["A fine text.", "Bad \ud800 text.", " \n\t ", "Another fine text."]
    results = extract_many(model, tok, texts, schema, max_tokens=24, batch_size=2, progress=False)
    assert [r.valid for r in results] == [True, False, False, True]
    assert results[1].error == "the text is not valid Unicode: a lone surrogate '\\ud800' at character 4"
    assert results[2].error == "the text is empty: there is nothing to extract"
    assert results[1].chunks == results[2].chunks == 0 and results[1].data is None
    model = None  # the refusal comes before any generation
    with pytest.raises(ValueError, match="the text is empty"):
        extract(model, tok, "   ", schema)
    with pytest.raises(ValueError, match="lone surrogate '\\\\udfff' at character 0"):
        extract(model, tok, "\udfff", schema)
    with pytest.raises(TypeError, match="text must be a string, not bytes"):
        extract(model, tok, b"text", schema)


def test_a_failing_row_is_reported_and_the_others_go_on(tiny):
    model, tok = tiny
    real = JSONConstraint.__call__

    def poisoned(self, tokens, logits):
        if "poison" in tok.decode(tokens[: self._prompt_len or len(tokens)].tolist()):
            raise RuntimeError("row broke")
        return real(self, tokens, logits)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(JSONConstraint, "__call__", poisoned)
        results = extract_many(model, tok, ["poison pill", "a fine text"], KEYWORD_SCHEMAS["enum_const"],
                               max_tokens=24, progress=False)
    assert not results[0].valid and results[0].error == "generation failed: row broke"
    assert results[1].valid and results[1].error is None


def test_extract_many_reports_each_text_as_it_finishes_and_stops_on_cancel(tiny):
    model, tok = tiny
    texts = [f"Invoice {i}: {i} EUR." for i in range(6)]
    seen, cancel = [], threading.Event()

    def on_result(i, result):
        seen.append(i)
        if len(seen) == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        extract_many(model, tok, texts, KEYWORD_SCHEMAS["enum_const"], max_tokens=24, batch_size=2,
                     progress=False, on_result=on_result, cancel=cancel)
    assert len(seen) == 2 and len(set(seen)) == 2


# --- command line -------------------------------------------------------------------------------------

def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_processes_jsonl_reports_bad_lines_and_writes_csv(tiny_checkpoint, tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", [
        json.dumps({"id": "inv-1", "text": SAMPLES["invoice"]}),
        '{"id": "broken", "text": ',
        json.dumps(SAMPLES["contact_card"]),
        "",
        json.dumps({"id": 7, "body": "no text field"}),
    ])
    out, table = tmp_path / "out.jsonl", tmp_path / "out.csv"
    code = main(["--schema", "invoice", "--input", str(docs), "--output", str(out), "--csv", str(table),
                 "--model", str(tiny_checkpoint), "--max-tokens", "32"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["inv-1", 2, 3, 7]
    assert [r["valid"] for r in records] == [True, False, True, False]
    assert records[1]["error"] == "line 2: not valid JSON (Expecting value at column 25)"
    assert records[3]["error"] == 'line 5: expected a string or an object with a string "text"'
    jsonschema.validate(records[0]["data"], PRESETS["invoice"])
    assert set(records[0]) == {"id", *Extraction.failed("").to_dict()}
    rows = list(csv.reader(table.open(encoding="utf-8")))
    assert rows[0] == ["id", "valid", "error", *PRESETS["invoice"]["properties"]]
    assert [row[:2] for row in rows[1:]] == [["inv-1", "true"], ["2", "false"], ["3", "true"], ["7", "false"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out.csv", "out.jsonl"]  # no temp files
    assert "4 records: 2 valid, 2 with errors" in capsys.readouterr().err


def test_cli_reads_a_directory_of_text_and_markdown_files_into_an_output_beside_them(tiny_checkpoint, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(SAMPLES["calendar_event"], encoding="utf-8")
    (docs / "sub" / "b.md").write_text("# Notes\nLunch with Bo on 2 May.", encoding="utf-8")
    (docs / "c.json").write_text("{}", encoding="utf-8")
    (docs / "latin1.txt").write_bytes("Caf\u00e9 at noon.".encode("latin-1"))
    out = docs / "out.jsonl"  # inside the input directory, but not one of the files read
    schema = tmp_path / "event.json"
    schema.write_text(json.dumps(PRESETS["calendar_event"]), encoding="utf-8")
    assert main(["--schema", str(schema), "--input", str(docs), "--output", str(out),
                 "--model", str(tiny_checkpoint), "--max-tokens", "24", "--temperature", "0.7", "--seed", "1"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["valid"]) for r in records] == [("a.txt", True), ("latin1.txt", False), ("sub/b.md", True)]
    assert records[1]["error"] == "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3): save the file as UTF-8"


@pytest.mark.parametrize("case, message", [
    ("missing_schema", "error: schema file not found: nope.json"),
    ("invalid_schema", "error: invalid schema: 'strin' is not valid under any of the given schemas at $.type"),
    ("missing_input", "error: input not found: "),
    ("empty_input", "error: no records in "),
])
def test_cli_errors_are_one_line_with_no_output(tmp_path, capsys, case, message):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "strin"} if case == "invalid_schema"
                                 else PRESETS["invoice"]), encoding="utf-8")
    docs = write_jsonl(tmp_path / "docs.jsonl", ["" if case == "empty_input" else json.dumps("text")])
    args = {"--schema": "nope.json" if case == "missing_schema" else str(schema),
            "--input": str(tmp_path / "absent.jsonl") if case == "missing_input" else str(docs),
            "--output": str(tmp_path / "out.jsonl")}
    assert main([x for kv in args.items() for x in kv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("number, error", [
    ("9" * 400, None),  # too big for a float: checked exactly
    ("9" * 400 + "1", None),
    ("1.005", "multipleOf failed at $.x: 1.005 is not a multiple of 0.01"),
    ("1e400", "multipleOf failed at $.x: inf is out of a number's range"),
])
def test_multiple_of_checks_numbers_beyond_a_float_without_crashing(number, error):
    data, problem = _parse('{"x": %s}' % number, {"properties": {"x": {"type": "number", "multipleOf": 0.01}}})
    assert problem == (error and f"output does not match the schema: {error}")


def test_forced_text_is_fed_in_one_pass_with_the_same_result(tiny):
    """Fast-forward: keys, separators and brackets the grammar forces join the sampled token in one
    forward pass; greedy extraction gives the same documents as token by token, in fewer steps."""
    model, tokenizer = tiny
    texts = list(SAMPLES.values())
    for schema_name in ("invoice", "contact_card"):
        runs = []
        for fast_forward in (False, True):
            engine = Engine(model, tokenizer, max_batch=4, fast_forward=fast_forward, draft_tokens=0)
            results = extract_many(model, tokenizer, texts, PRESETS[schema_name], max_tokens=160, progress=False,
                                   engine=engine)
            runs.append(([(r.data, r.valid, r.stats.generation_tokens) for r in results], engine.steps))
        (plain, plain_steps), (fast, fast_steps) = runs
        assert fast == plain and all(valid for _, valid, _ in fast)
        assert fast_steps < plain_steps


@pytest.mark.parametrize("options", [dict(), dict(max_kv_size=256)])
def test_prompt_lookup_under_the_constraint_gives_the_token_by_token_output(tiny, options):
    """Drafts copied from the prompt, cut where the grammar rejects them and verified against masked
    greedy decoding: the same text as token by token, in fewer passes (an oracle steers the random
    model to write each preset's perfect extraction, whose values the document holds)."""
    from lfm_mlx.bench_extraction import Oracle, extraction_prompt
    model, tokenizer = tiny
    for name in ("invoice", "contact_card", "job_posting"):
        runs = []
        for fast_forward, draft_tokens in ((False, 0), (True, 0), (True, 4)):
            engine = Engine(model, tokenizer, max_batch=2, fast_forward=fast_forward, draft_tokens=draft_tokens)
            requests = [Request(extraction_prompt(tokenizer, PRESETS[name], SAMPLES[name]), max_tokens=budget,
                                sampling=SamplingSettings(temperature=0.0), **options,
                                logits_processors=[JSONConstraint(tokenizer, PRESETS[name], vocab_size=model.args.vocab_size,
                                                                  max_tokens=budget), Oracle(tokenizer, EXPECTED[name])])
                        for budget in (60, 400)]  # one closed early by its budget, one complete
            texts = ["", ""]
            for i, item in engine.stream_many(requests):
                if item is not None:
                    texts[i] += item.text
            runs.append((texts, engine.steps))
        (plain, plain_steps), (fast, fast_steps), (drafted, drafted_steps) = runs
        assert plain == fast == drafted
        assert json.loads(drafted[1]) == EXPECTED[name] and json.loads(drafted[0])
        assert drafted_steps < fast_steps < plain_steps


def test_a_budget_below_the_schema_minimum_is_refused_before_generating(tiny):
    model, tokenizer = tiny
    schema = {"type": "object", "required": ["name", "city"],
              "properties": {"name": {"type": "string"}, "city": {"type": "string"}}}
    with pytest.raises(BudgetError) as refused:
        extract(model, tokenizer, "Ada lives in London.", schema, max_tokens=4)
    minimum = refused.value.minimum
    result = extract(model, tokenizer, "Ada lives in London.", schema, max_tokens=minimum)
    assert result.valid and set(result.data) == {"name", "city"}


def test_cli_refuses_a_budget_below_the_schema_minimum(tmp_path, capsys, tiny_checkpoint):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(PRESETS["invoice"]), encoding="utf-8")
    docs = write_jsonl(tmp_path / "docs.jsonl", [json.dumps("text")])
    assert main(["--schema", str(schema), "--input", str(docs), "--output", str(tmp_path / "out.jsonl"),
                 "--model", str(tiny_checkpoint), "--max-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: max_tokens=3 is too small for this schema: its shortest complete document takes "
                        r"(\d+) tokens; set max_tokens to at least \1\n", err)
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_runs_as_a_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lfm_mlx.extract", "--schema", "nope.json", "--input", "x",
                           "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and proc.stderr == "error: schema file not found: nope.json\n"



def small_schema(tmp_path: Path) -> str:
    """A schema the tiny model completes in a few tokens: CLI tests about records, not about generation."""
    path = tmp_path / "small.json"
    path.write_text(json.dumps(KEYWORD_SCHEMAS["enum_const"]), encoding="utf-8")
    return str(path)


def test_cli_turns_bad_bytes_lone_surrogates_empty_texts_and_repeated_ids_into_error_rows(tiny_checkpoint, tmp_path):
    lines = [json.dumps({"id": "ok", "text": "Bo paid 5 EUR."}).encode(),
             b'"Caf\xe9 bill"',  # latin-1, not UTF-8
             b'{"id": "surrogate", "text": "Bo \\ud800 paid."}',  # legal JSON, not valid Unicode
             json.dumps({"id": "blank", "text": "  \n "}).encode(),
             json.dumps({"id": "ok", "text": "Again."}).encode(),
             json.dumps({"id": [1], "text": "A list id."}).encode(),
             json.dumps("Last one.").encode()]
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # a byte-order mark and CRLF, as Notepad saves
    out = tmp_path / "out.jsonl"
    assert main(["--schema", small_schema(tmp_path), "--input", str(docs), "--output", str(out),
                 "--model", str(tiny_checkpoint), "--max-tokens", "16"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    second_line = 3 + len(lines[0]) + 2
    assert [(r["id"], r["valid"], r["error"]) for r in rows] == [
        ("ok", True, None),
        (2, False, f"line 2: not UTF-8 text (byte 0xe9 at offset {second_line + 4} of the file): save the file as UTF-8"),
        ("surrogate", False, "the text is not valid Unicode: a lone surrogate '\\ud800' at character 3"),
        ("blank", False, "the text is empty: there is nothing to extract"),
        ("ok", False, 'line 5: id "ok" is already used on line 1: give each record its own id'),
        (6, False, 'line 6: "id" must be a string or an integer, not [1]'),
        (7, True, None)]


@pytest.mark.parametrize("case", ["output_is_input", "output_symlinks_to_input", "output_hard_links_input",
                                  "output_is_schema", "csv_is_input", "csv_is_output", "output_is_a_file_read"])
def test_cli_refuses_to_write_over_an_input_before_loading_the_model(tmp_path, capsys, case):
    docs = write_jsonl(tmp_path / "docs.jsonl", [json.dumps("Bo paid 5 EUR.")])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("Bo paid 5 EUR.", encoding="utf-8")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PRESETS["invoice"]), encoding="utf-8")
    link = tmp_path / "link.jsonl"
    if case == "output_symlinks_to_input":
        link.symlink_to(docs)
    if case == "output_hard_links_input":
        link.hardlink_to(docs)
    source, output, table, expected = {
        "output_is_input": (docs, docs, None, f"--output {docs} is the --input file"),
        "output_symlinks_to_input": (docs, link, None, f"--output {link} is the --input file"),
        "output_hard_links_input": (docs, link, None, f"--output {link} is the --input file"),
        "output_is_schema": (docs, schema, None, f"--output {schema} is the --schema file"),
        "csv_is_input": (docs, tmp_path / "out.jsonl", docs, f"--csv {docs} is the --input file"),
        "csv_is_output": (docs, tmp_path / "out.jsonl", tmp_path / "out.jsonl", "--csv and --output are the same file"),
        "output_is_a_file_read": (folder, folder / "a.txt", None, f"--output {folder / 'a.txt'} is a.txt in the "
                                                                   "--input directory"),
    }[case]
    before = {p: p.read_bytes() for p in (docs, schema, folder / "a.txt")}
    argv = ["--schema", str(schema), "--input", str(source), "--output", str(output), "--model", "/nonexistent"]
    assert main(argv + (["--csv", str(table)] if table else [])) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_refuses_bad_numbers_before_loading_the_model(tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", [json.dumps("text")])
    base = ["--schema", "invoice", "--input", str(docs), "--output", str(tmp_path / "out.jsonl"), "--model", "/none"]
    for flag, value in [("--batch-size", "0"), ("--max-tokens", "-3"), ("--context-budget", "many"),
                        ("--temperature", "nan"), ("--temperature", "9")]:
        with pytest.raises(SystemExit) as exit_:
            main(base + [flag, value])
        assert exit_.value.code == 2
        assert f"error: argument {flag}: must be a " in capsys.readouterr().err


EXTRACT_MANY = extract_module.extract_many  # unpatched, whatever an earlier interrupt_after installed


def interrupt_after(monkeypatch, n: int, stop) -> tuple[list, list]:
    """Make the CLI's `extract_many` call `stop()` once `n` documents have finished; returns the texts
    it was asked for and the indices of the documents that finished."""
    real, calls, finished = EXTRACT_MANY, [], []

    def extract_many(model, tokenizer, texts, schema, on_result=None, **options):
        calls.append(list(texts))

        def record(i, result):
            if len(finished) == n:
                stop()
            finished.append(i)
            on_result(i, result)

        return real(model, tokenizer, texts, schema, on_result=record, **options)

    monkeypatch.setattr(extract_module, "extract_many", extract_many)
    return calls, finished


def ctrl_c():
    raise KeyboardInterrupt


def test_cli_keeps_finished_records_on_ctrl_c_and_resume_extracts_only_the_rest(tiny_checkpoint, tmp_path, capsys,
                                                                               monkeypatch):
    texts = [f"Invoice {i} from Shop {i}: {i} EUR." for i in range(6)]
    docs = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)]
                       + ['{"id": "broken", '])
    out, table = tmp_path / "out.jsonl", tmp_path / "out.csv"
    argv = ["--schema", small_schema(tmp_path), "--input", str(docs), "--output", str(out), "--csv", str(table),
            "--model", str(tiny_checkpoint), "--max-tokens", "16", "--batch-size", "2"]
    calls, finished = interrupt_after(monkeypatch, 4, ctrl_c)
    assert main(argv) == 130
    assert calls == [texts]
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"interrupted: 5 of 7 records written to {out}; to extract the other 2, "
                   "run the same command again with --resume")
    done = sorted(finished[:4])
    first = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in first] == [f"d{i}" for i in done] + [7]  # in input order
    assert all(json.loads(line)["valid"] for line in first[:4])
    assert len(list(csv.reader(table.open(encoding="utf-8")))) == 1 + 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out.csv", "out.jsonl", "out.jsonl.journal",
                                                          "small.json"]
    journal = [json.loads(line) for line in (tmp_path / "out.jsonl.journal").read_text(encoding="utf-8").splitlines()]
    assert sorted(row["id"] for row in journal) == [f"d{i}" for i in done]  # appended as each finished

    lines = docs.read_text(encoding="utf-8").splitlines()
    lines[6] = json.dumps({"id": "broken", "text": "Fixed: 9 EUR."})  # a bad line fixed meanwhile is extracted
    write_jsonl(docs, lines)
    calls, _ = interrupt_after(monkeypatch, 99, ctrl_c)
    assert main(argv + ["--resume"]) == 0
    assert calls == [[t for i, t in enumerate(texts) if i not in done] + ["Fixed: 9 EUR."]]
    final = out.read_text(encoding="utf-8").splitlines()
    assert [line for line in final if line in first] == first[:4]  # kept as they were
    assert [json.loads(line)["id"] for line in final] == ["d0", "d1", "d2", "d3", "d4", "d5", "broken"]
    assert all(json.loads(line)["valid"] for line in final)
    assert [row[0] for row in csv.reader(table.open(encoding="utf-8"))][1:] == [
        "d0", "d1", "d2", "d3", "d4", "d5", "broken"]
    assert "resuming: 4 records kept" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.journal").exists()  # the output holds everything now


def test_cli_keeps_finished_records_on_sigterm_and_leaves_an_earlier_output_if_nothing_finished(
        tiny_checkpoint, tmp_path, capsys, monkeypatch):
    docs = write_jsonl(tmp_path / "docs.jsonl", [json.dumps(f"Invoice {i}: {i} EUR.") for i in range(4)])
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier run's results\n", encoding="utf-8")
    argv = ["--schema", small_schema(tmp_path), "--input", str(docs), "--output", str(out),
            "--model", str(tiny_checkpoint), "--max-tokens", "16", "--batch-size", "2"]
    interrupt_after(monkeypatch, 0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main(argv) == 143
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted: no record finished; nothing written"
    assert out.read_text(encoding="utf-8") == "an earlier run's results\n"
    _, finished = interrupt_after(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main(argv) == 143
    assert [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()] == \
        sorted(i + 1 for i in finished[:2])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


@pytest.mark.parametrize("earlier, message", [
    ('{"id": "elsewhere", "valid": true, "chunks": 1}\n', 'holds results for ids that are not in the input (e.g. "elsewhere")'),
    ("id,valid\n", "line 1 of "),
])
def test_cli_resume_refuses_an_output_it_did_not_write_for_this_input(tmp_path, capsys, earlier, message):
    docs = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"id": "a", "text": "Bo paid."})])
    out = tmp_path / "out.jsonl"
    out.write_text(earlier, encoding="utf-8")
    assert main(["--schema", "invoice", "--input", str(docs), "--output", str(out), "--resume",
                 "--model", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume: ") and message in err and err.count("\n") == 1
    assert out.read_text(encoding="utf-8") == earlier
