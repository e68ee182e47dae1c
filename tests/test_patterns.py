"""Shortest completions of JSON Schema patterns (the closing planner's way out of a pattern-bound string)."""

import re

import pytest

from lfm_mlx.patterns import compile_pattern, schema_patterns


@pytest.mark.parametrize("pattern, text, completion", [
    ("wpc-[0-9]+", "x7", "wpc-0"),  # not anchored: a match anywhere will do
    ("(.+/)?.+:.+", "ab", ":a"),
    ("(.+/)?.+:.+", "", "a:a"),
    ("^wpc-[0-9]+$", "wp", "c-0"),
    ("^[A-Z]{2}\\d{3}$", "A", "A000"),
    ("^\\+?[1-9]\\d{1,14}$", "+", "10"),
    ("^[a-z]([-a-z]*[a-z])?$", "a-", "a"),  # a trailing '-' needs one more letter
    ("^(a|bc)*d$", "bc", "d"),
    ("x{3,5}", "", "xxx"),
    ("^.{1,255}$", "", "a"),
    ("^[^\\s]+$", "", "a"),
    ("abc", "zzabc", ""),  # already matches
])
def test_shortest_completion(pattern, text, completion):
    found = compile_pattern(pattern).completion(text)
    assert found == completion
    assert re.search(pattern, text + found)


@pytest.mark.parametrize("pattern, text", [("^a$", "a-"), ("^wpc", "x")])
def test_no_completion_for_a_text_the_pattern_cannot_continue(pattern, text):
    assert compile_pattern(pattern).completion(text) is None


@pytest.mark.parametrize("pattern", ["^(?!x)a", "(a)\\1", "[", "a{1,100000}"])
def test_patterns_it_cannot_search_are_left_to_the_heuristics(pattern):
    assert compile_pattern(pattern) is None


def test_schema_patterns_finds_value_and_key_patterns():
    schema = {"properties": {"pattern": {"type": "string", "pattern": "^a+$"},
                             "m": {"patternProperties": {"^x-": {}}}},
              "items": [{"pattern": "b"}, {"pattern": "^a+$"}]}
    assert schema_patterns(schema) == ("^a+$", "^x-", "b")
