"""Grounding: each extracted string traced to its characters in the source."""

from __future__ import annotations

from lfm_mlx.grounding import Grounder, ground, string_leaves


def test_grounding_exact_then_case_and_whitespace_insensitive():
    text = "Invoice for ACME Corp.\nShip to:  Rua das\n   Flores 8, Porto. Contact: acme corp sales."
    spans = ground({"a": "ACME Corp", "b": "acme corp", "c": "Rua das Flores 8", "d": "RUA DAS FLORES",
                    "e": "Lisbon", "f": "  Porto ", "g": ""}, text)
    assert spans["$.a"] == (12, 21)  # exact
    assert spans["$.b"] == (text.index("acme corp"), text.index("acme corp") + 9)  # exact wins over folded
    start = text.index("Rua")
    assert spans["$.c"] == (start, text.index("8,") + 1)  # across a line break and extra spaces
    assert spans["$.d"] == (start, text.index("Flores") + 6)
    assert spans["$.e"] is None and spans["$.g"] is None
    assert spans["$.f"] == (text.index("Porto"), text.index("Porto") + 5)  # stripped


def test_grounding_prefers_whole_words_and_maps_case_folding_back():
    text = "Annual report by Ann. Straße 5"
    grounder = Grounder(text)
    assert grounder.find("Ann") == (17, 20)
    assert grounder.find("nua") == (2, 5)  # inside a word when that is all there is
    assert grounder.find("STRASSE 5") == (text.index("Straße"), len(text))


def test_grounding_paths_cover_nested_arrays_and_odd_keys():
    data = {"items": [{"name": "a"}, {"name": "b", "tags": ["c"]}], "first name": "d", "n": 1, "x": None}
    assert [p for p, _ in string_leaves(data)] == [
        "$.items[0].name", "$.items[1].name", "$.items[1].tags[0]", "$['first name']"]
