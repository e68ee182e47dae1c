import gc
import random
import time

import pytest

from lfm_mlx.tools import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    format_tool_calls,
    parse_tool_calls,
    split_reply,
    split_tool_calls,
    tool_function,
)


def wrap(body: str) -> str:
    return f"{TOOL_CALL_START}{body}{TOOL_CALL_END}"


def test_markers_are_the_lfm2_special_tokens():
    assert TOOL_CALL_START == "<|tool_call_start|>"
    assert TOOL_CALL_END == "<|tool_call_end|>"


def test_parses_two_calls_with_keyword_arguments():
    text = wrap('[get_weather(city="Paris"), search(q="x", limit=3)]')
    assert parse_tool_calls(text) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "search", "arguments": {"q": "x", "limit": 3}},
    ]


def test_parses_single_call_without_list_brackets():
    assert parse_tool_calls(wrap('get_time(tz="UTC")')) == [
        {"name": "get_time", "arguments": {"tz": "UTC"}}
    ]


def test_parses_bare_comma_separated_calls_as_a_sequence():
    assert parse_tool_calls(wrap("a(x=1), b(y=2)")) == [
        {"name": "a", "arguments": {"x": 1}},
        {"name": "b", "arguments": {"y": 2}},
    ]


def test_error_raw_is_exact_source_after_unicode_text():
    [ok, bad] = parse_tool_calls(wrap('[ok(a="é東京😀"), f(x=y, z="ü")]'))
    assert ok == {"name": "ok", "arguments": {"a": "é東京😀"}}
    assert bad["raw"] == 'f(x=y, z="ü")'
    assert bad["name"] == "f"


def test_error_raw_is_exact_source_on_later_lines_with_any_line_break():
    body = '[\r\n  ok(a="é"),\r  bad(x=y,\n      z="東京"),\n  ok(b=1)\r\n]'
    [first, bad, last] = parse_tool_calls(wrap(body))
    assert first == {"name": "ok", "arguments": {"a": "é"}}
    assert bad["raw"] == 'bad(x=y,\n      z="東京")'
    assert last == {"name": "ok", "arguments": {"b": 1}}


def best_parse_seconds(text: str, repeats: int) -> float:
    """CPU time, best of several runs: the least disturbed by other work on a shared machine. The
    garbage collector is off: its full passes cost what the whole test process holds, not the input."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.process_time()
            parse_tool_calls(text)
            best = min(best, time.process_time() - start)
    finally:
        gc.enable()
    return best


def test_parsing_time_grows_linearly_with_the_number_of_calls():
    def span(n):
        return wrap("[" + ", ".join(f'get_weather(city="Paris {i}", days={i % 7})' for i in range(n)) + "]")

    small, large = span(2_000), span(20_000)
    calls = parse_tool_calls(large)
    assert len(calls) == 20_000
    assert calls[0] == {"name": "get_weather", "arguments": {"city": "Paris 0", "days": 0}}
    assert calls[-1] == {"name": "get_weather", "arguments": {"city": "Paris 19999", "days": 19999 % 7}}
    # 10x the calls: linear is ~10x the time; the old per-node source lookup was ~100x
    assert best_parse_seconds(large, repeats=3) < 25 * best_parse_seconds(small, repeats=5)


def test_error_entries_of_a_long_span_keep_their_own_source():
    calls = parse_tool_calls(wrap("[" + ", ".join(f"f(i={i}, x=y{i})" for i in range(5_000)) + "]"))
    assert [c["raw"] for c in calls[-2:]] == ["f(i=4998, x=y4998)", "f(i=4999, x=y4999)"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_bare_list_of_calls_to_known_tools_is_parsed():
    text = '  [get_weather(city="Paris", days=true), search(q="x", limit=3)]\n'
    assert parse_tool_calls(text, ["get_weather", "search"]) == [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": True}},
        {"name": "search", "arguments": {"q": "x", "limit": 3}},
    ]
    assert parse_tool_calls('[get_weather(city="Oslo")]', [WEATHER]) == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}]


def test_bare_call_with_a_bad_argument_is_an_error_entry():
    assert parse_tool_calls("[get_weather(city=Paris)]", [WEATHER]) == [{
        "name": "get_weather", "arguments": {}, "error": "argument 'city' is not a literal value",
        "raw": "get_weather(city=Paris)"}]


@pytest.mark.parametrize("text", [
    "[get_weather(city='Paris'), unknown(x=1)]",  # a name that is not a tool
    "[1, 2, 3] are the first primes",  # ordinary text that starts with "["
    "[get_weather(city='Paris')] is what I would call",  # text after the list
    "Sure: [get_weather(city='Paris')]",  # text before it
    "[get_weather(city='Paris'), 7]",  # not only calls
    "[note] get_weather(city='Paris')",
    "get_weather(city='Paris')",  # no list
    "(get_weather(city='Paris'),)",
    "[]",
    "[get_weather(city='Paris'",
])
def test_text_that_is_not_only_a_list_of_known_calls_has_no_calls(text):
    assert parse_tool_calls(text, ["get_weather"]) == []
    assert split_reply(text, ["get_weather"]) == (text, [])


def test_bare_form_needs_the_tools():
    assert parse_tool_calls("[get_weather(city='Paris')]") == []
    assert parse_tool_calls("[get_weather(city='Paris')]", []) == []


def test_wrapped_calls_are_parsed_as_before_when_tools_are_given():
    text = "Checking. " + wrap("[anything(x=1)]")
    assert parse_tool_calls(text, ["get_weather"]) == [{"name": "anything", "arguments": {"x": 1}}]


def test_split_reply_gives_content_and_calls_in_either_form():
    wrapped = "Let me check.\n" + wrap('[get_weather(city="Paris")]') + "\n"
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert split_reply(wrapped) == ("Let me check.", [call])
    assert split_reply(wrapped, [WEATHER]) == ("Let me check.", [call])
    assert split_reply(' [get_weather(city="Paris")] ', [WEATHER]) == ("", [call])
    assert split_reply("  It is sunny.\n", [WEATHER]) == ("  It is sunny.\n", [])
    unterminated = "Hm " + TOOL_CALL_START + "[get_weather(city="
    content, [entry] = split_reply(unterminated)
    assert content == "Hm" and entry["error"].startswith("unterminated tool call")


def test_tool_function_accepts_openai_and_bare_tools():
    function = {"name": "f", "description": "d", "parameters": {"type": "object"}}
    assert tool_function({"type": "function", "function": function}) is function
    assert tool_function(function) is function


def test_parses_call_without_arguments_and_empty_list():
    assert parse_tool_calls(wrap("[ping()]")) == [{"name": "ping", "arguments": {}}]
    assert parse_tool_calls(wrap("[]")) == []


def test_text_without_markers_has_no_calls():
    assert parse_tool_calls("Just a normal answer [f(x=1)].") == []
    assert parse_tool_calls("") == []


def test_parses_nested_lists_dicts_and_tuples():
    text = wrap('[f(items=[1, [2, 3], {"a": {"b": [4.5]}}], pair=(1, "two"), empty={})]')
    assert parse_tool_calls(text) == [
        {
            "name": "f",
            "arguments": {
                "items": [1, [2, 3], {"a": {"b": [4.5]}}],
                "pair": (1, "two"),
                "empty": {},
            },
        }
    ]


def test_dotted_name_is_kept_whole():
    assert parse_tool_calls(wrap("[math.sqrt(x=2), a.b.c(y=1)]")) == [
        {"name": "math.sqrt", "arguments": {"x": 2}},
        {"name": "a.b.c", "arguments": {"y": 1}},
    ]


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ('"a]b"', "a]b"),
        ('"a)b"', "a)b"),
        ('"a, b=c"', "a, b=c"),
        ('"say \\"hi\\""', 'say "hi"'),
        ("'it\\'s'", "it's"),
        ('"it\'s"', "it's"),
        ("'say \"hi\"'", 'say "hi"'),
        ('"line1\\nline2\\ttab"', "line1\nline2\ttab"),
        ('"back\\\\slash"', "back\\slash"),
        ('"caf\u00e9 \u6771\u4eac \U0001f600"', "caf\u00e9 \u6771\u4eac \U0001f600"),
        ('"\\u00e9"', "\u00e9"),
        ('""', ""),
        ('"""triple "quoted" ]"""', 'triple "quoted" ]'),
    ],
)
def test_string_argument_keeps_special_characters(literal, expected):
    text = wrap(f"[f(s={literal}, after=1)]")
    assert parse_tool_calls(text) == [{"name": "f", "arguments": {"s": expected, "after": 1}}]


def test_json_style_true_false_null_map_to_python():
    text = wrap("[f(a=true, b=false, c=null, d=[true, {\"k\": null}], e=True, g=None)]")
    assert parse_tool_calls(text) == [
        {
            "name": "f",
            "arguments": {"a": True, "b": False, "c": None, "d": [True, {"k": None}], "e": True, "g": None},
        }
    ]


def test_negative_and_float_numbers():
    text = wrap("[f(a=-3, b=2.5, c=-0.125, d=1e-3, e=[-1, -2.0], f=0)]")
    [call] = parse_tool_calls(text)
    assert call == {
        "name": "f",
        "arguments": {"a": -3, "b": 2.5, "c": -0.125, "d": 0.001, "e": [-1, -2.0], "f": 0},
    }
    assert type(call["arguments"]["a"]) is int
    assert type(call["arguments"]["b"]) is float


def test_text_around_and_two_separate_spans():
    text = (
        "Let me check. "
        + wrap('[get_weather(city="Paris")]')
        + " and then "
        + wrap('lookup(id=7)')
        + " done."
    )
    assert parse_tool_calls(text) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "lookup", "arguments": {"id": 7}},
    ]


def test_deeply_nested_literal_within_parser_limit_is_parsed():
    [call] = parse_tool_calls(wrap("f(x=" + "[" * 150 + "]" * 150 + ")"))
    value = call["arguments"]["x"]
    for _ in range(149):
        value = value[0]
    assert value == []


def test_unknown_escape_keeps_backslash_without_warning(recwarn):
    # The model wrote f(p="C:\data", q="\w+"): not valid escapes, so the backslash stays.
    text = wrap('f(p="C:\\data", q="\\w+")')
    assert parse_tool_calls(text) == [{"name": "f", "arguments": {"p": "C:\\data", "q": "\\w+"}}]
    assert len(recwarn) == 0


def test_whitespace_and_newlines_inside_span_are_tolerated():
    text = wrap('\n[\n  f(\n    a=1,\n    b="x",\n  ),\n]\n')
    assert parse_tool_calls(text) == [{"name": "f", "arguments": {"a": 1, "b": "x"}}]


def test_syntax_error_gives_error_entry_with_guessed_name():
    body = '[get_weather(city="Paris"]'
    [entry] = parse_tool_calls(wrap(body))
    assert entry["name"] == "get_weather"
    assert entry["arguments"] == {}
    assert entry["raw"] == body
    assert entry["error"].startswith("invalid tool call syntax:")
    assert "\n" not in entry["error"]


def test_unterminated_span_gives_error_entry():
    text = "ok " + wrap("[a(x=1)]") + f' {TOOL_CALL_START}[search(q="par'
    assert parse_tool_calls(text) == [
        {"name": "a", "arguments": {"x": 1}},
        {
            "name": "search",
            "arguments": {},
            "error": "unterminated tool call: missing <|tool_call_end|>",
            "raw": '[search(q="par',
        },
    ]


@pytest.mark.parametrize(
    ("call", "name", "error"),
    [
        ("f(x=y)", "f", "argument 'x' is not a literal value"),
        ("f(x=g())", "f", "argument 'x' is not a literal value"),
        ("f(x=set())", "f", "argument 'x' is not a literal value"),
        ("f(x=[1, y])", "f", "argument 'x' is not a literal value"),
        ("f(x=1 + 2)", "f", "argument 'x' is not a literal value"),
        ("f(x={**d})", "f", "argument 'x' is not a literal value"),
        ('f("Paris")', "f", "positional arguments are not supported; use keyword arguments"),
        ("f(**kw)", "f", "**kwargs unpacking is not supported"),
        ("f(x=1, x=2)", "f", "argument 'x' given more than once"),
        ("f()(x=1)", None, "function name must be an identifier or dotted identifier"),
        ("x[0](a=1)", None, "function name must be an identifier or dotted identifier"),
    ],
)
def test_invalid_call_gives_error_entry_and_keeps_valid_neighbours(call, name, error):
    text = wrap(f'[ok(a=1), {call}, ok(b="2")]')
    assert parse_tool_calls(text) == [
        {"name": "ok", "arguments": {"a": 1}},
        {"name": name, "arguments": {}, "error": error, "raw": call},
        {"name": "ok", "arguments": {"b": "2"}},
    ]


def test_non_call_elements_give_error_entries():
    assert parse_tool_calls(wrap("[1, 2]")) == [
        {"name": None, "arguments": {}, "error": "expected a function call like name(arg=value)", "raw": "1"},
        {"name": None, "arguments": {}, "error": "expected a function call like name(arg=value)", "raw": "2"},
    ]
    [entry] = parse_tool_calls(wrap('"just a string"'))
    assert entry == {
        "name": None,
        "arguments": {},
        "error": "expected a function call like name(arg=value)",
        "raw": '"just a string"',
    }


@pytest.mark.parametrize(
    "body",
    [
        "",
        "[" * 1000 + "]" * 1000,
        "f(x=" + "-" * 100_000 + "1)",
        "f(x=" + "1+" * 100_000 + "1)",
        "f(x=" + "-" * 50 + "1)",
        "f(x=" + "9" * 5000 + ")",
        'f(x="\x00")',
        'f(x="\ud800")',
        "import os",
        "lambda: 0",
        "f(x={[1]: 2})",
    ],
)
def test_hostile_span_gives_error_entry_and_never_raises(body):
    result = parse_tool_calls(wrap(body))
    assert len(result) == 1
    assert result[0]["arguments"] == {}
    assert isinstance(result[0]["error"], str) and result[0]["error"]
    assert "\n" not in result[0]["error"]


def test_random_fuzz_never_raises_and_returns_well_formed_entries():
    rng = random.Random(0)
    alphabet = [
        "[", "]", "(", ")", "{", "}", '"', "'", ",", "=", ":", ".", "-", " ", "\\", "\n",
        "f", "get_weather", "x", "city", "1", "2.5", "true", "null", "None", "lambda",
        TOOL_CALL_START, TOOL_CALL_END,
    ]
    seen_valid = seen_error = 0
    for _ in range(500):
        pieces = [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.7:
            pieces = [TOOL_CALL_START, "[", "f(x="] + pieces + [")]", TOOL_CALL_END]
        result = parse_tool_calls("".join(pieces))
        assert isinstance(result, list)
        for entry in result:
            assert isinstance(entry, dict)
            assert entry["name"] is None or isinstance(entry["name"], str)
            assert isinstance(entry["arguments"], dict)
            if "error" in entry:
                seen_error += 1
                assert entry["arguments"] == {}
                assert isinstance(entry["error"], str) and isinstance(entry["raw"], str)
            else:
                seen_valid += 1
                assert isinstance(entry["name"], str)
    assert seen_valid > 0
    assert seen_error > 0


def test_format_renders_like_the_chat_template():
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
        {"name": "math.sqrt", "arguments": {"x": -2.5, "exact": True, "tag": None}},
        {"name": "f", "arguments": {"items": [1, "a", None, False], "opts": {"k": "é"}}},
    ]
    assert format_tool_calls(calls) == (
        '<|tool_call_start|>[get_weather(city="Paris", days=3), '
        "math.sqrt(x=-2.5, exact=True, tag=None), "
        'f(items=[1, "a", null, false], opts={"k": "é"})]<|tool_call_end|>'
    )
    assert format_tool_calls([]) == "<|tool_call_start|>[]<|tool_call_end|>"


def test_format_then_parse_round_trips_json_like_arguments():
    calls = [
        {"name": "ping", "arguments": {}},
        {
            "name": "search.web",
            "arguments": {
                "q": 'quotes " \' ] ) , and \\ backslash\nnewline\t\u00e9\u6771\U0001f600\u2028\x00\x7f',
                "n": -12,
                "score": 0.1,
                "big": 1e300,
                "flag": False,
                "none": None,
                "nested": {"a": [1, 2.5, True, None, {"b": ["c", []]}], "": "empty key"},
            },
        },
    ]
    assert parse_tool_calls(format_tool_calls(calls)) == calls


def test_format_rejects_names_that_would_not_parse_back():
    with pytest.raises(ValueError, match="invalid tool name"):
        format_tool_calls([{"name": "bad name", "arguments": {}}])
    with pytest.raises(ValueError, match="invalid argument name 'from'"):
        format_tool_calls([{"name": "f", "arguments": {"from": 1}}])


def test_split_returns_text_and_tool_call_segments_in_order():
    first = wrap('[a(x=1)]')
    second = wrap("b()")
    text = f"Hi {first}{second} bye"
    assert split_tool_calls(text) == [
        ("text", "Hi "),
        ("tool_call", first),
        ("tool_call", second),
        ("text", " bye"),
    ]
    assert "".join(segment for _, segment in split_tool_calls(text)) == text


def test_split_keeps_unterminated_trailing_span_as_tool_call():
    text = f"Working {TOOL_CALL_START}[search(q="
    assert split_tool_calls(text) == [
        ("text", "Working "),
        ("tool_call", f"{TOOL_CALL_START}[search(q="),
    ]


def test_split_plain_text_and_empty_string():
    assert split_tool_calls("no tools here") == [("text", "no tools here")]
    assert split_tool_calls("") == []
    assert split_tool_calls(TOOL_CALL_END + " stray end") == [("text", TOOL_CALL_END + " stray end")]
