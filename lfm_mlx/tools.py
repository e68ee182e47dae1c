"""Parse and render LFM2 "pythonic" tool calls.

LFM2 models emit tool calls as a Python-like list of keyword-argument calls
between special tokens::

    <|tool_call_start|>[get_weather(city="Paris"), search(q="x", limit=3)]<|tool_call_end|>

LFM2.5 sometimes writes the same list without the markers; given the tool
names, a reply that is nothing but such a list is read as calls too.

Model output is untrusted, so calls are read with ``ast.parse`` and only
literal argument values are accepted; nothing is ever evaluated.  Parsing
never raises: a malformed call becomes an entry with an ``"error"`` key so a
caller can report it back to the model instead of crashing mid-conversation.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import warnings
from collections.abc import Iterable
from typing import Any

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"

# The model sometimes writes JSON literals inside the Python-like syntax.
_JSON_NAMES = {"true": True, "false": False, "null": None}
# Best-effort name for a span that does not even parse, so errors can say which tool.
_LEADING_NAME = re.compile(r"\s*\[?\s*([A-Za-z_][\w.]*)\s*\(")
# ast.parse / literal_eval failures on hostile input (deep nesting, huge ints,
# null bytes, lone surrogates) surface as one of these.
_PARSE_ERRORS = (SyntaxError, ValueError, TypeError, RecursionError, MemoryError)
# Line breaks as Python's tokenizer counts them, for turning (line, column) into an offset.
_LINE_BREAK = re.compile(rb"\r\n?|\n")


def split_tool_calls(text: str) -> list[tuple[str, str]]:
    """Split ``text`` into ``("text", ...)`` and ``("tool_call", ...)`` segments, in order.

    Tool-call segments keep their markers so a UI can render them verbatim.  An
    unterminated trailing span is still a ``"tool_call"`` segment because a
    streaming generation may not have produced the end marker yet.
    """
    segments: list[tuple[str, str]] = []
    pos = 0
    while (start := text.find(TOOL_CALL_START, pos)) != -1:
        if start > pos:
            segments.append(("text", text[pos:start]))
        end = text.find(TOOL_CALL_END, start + len(TOOL_CALL_START))
        pos = len(text) if end == -1 else end + len(TOOL_CALL_END)
        segments.append(("tool_call", text[start:pos]))
    if pos < len(text):
        segments.append(("text", text[pos:]))
    return segments


def parse_tool_calls(text: str, tools: Iterable[str | dict] | None = None) -> list[dict[str, Any]]:
    """Return every tool call in ``text`` as ``{"name": str, "arguments": dict}``.

    Invalid calls or spans are returned in place as
    ``{"name": str | None, "arguments": {}, "error": str, "raw": str}``, where
    ``raw`` is the call's source, or the span's content (without markers) when
    the whole span is unusable.

    ``tools`` (names, or definitions as for ``tool_function``) also enables the
    bare form: a reply without markers that, stripped, is a non-empty list of
    calls to those tools only.  Anything else without markers is plain text, so
    an answer that merely starts with "[" is never taken for a call.
    """
    if tools is not None and TOOL_CALL_START not in text:
        return _bare_calls(text.strip(), {_tool_name(tool) for tool in tools})
    calls: list[dict[str, Any]] = []
    for kind, segment in split_tool_calls(text):
        if kind != "tool_call":
            continue
        if not segment.endswith(TOOL_CALL_END):
            body = segment[len(TOOL_CALL_START):].strip()
            message = f"unterminated tool call: missing {TOOL_CALL_END}"
            calls.append(_error(body, message, _guess_name(body)))
            continue
        calls.extend(_parse_span(segment[len(TOOL_CALL_START):-len(TOOL_CALL_END)].strip()))
    return calls


def split_reply(text: str, tools: Iterable[str | dict] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A finished reply as ``(content, calls)``, as an OpenAI-style server returns it.

    ``calls`` is ``parse_tool_calls(text, tools)``.  With calls, ``content`` is the
    text outside the tool-call spans, stripped ("" for the bare form); without,
    it is ``text`` unchanged.
    """
    calls = parse_tool_calls(text, tools)
    if not calls:
        return text, []
    content = "".join(segment for kind, segment in split_tool_calls(text) if kind == "text")
    return content.strip() if TOOL_CALL_START in text else "", calls


def tool_function(tool: dict) -> dict:
    """The ``{"name", "description", "parameters"}`` part of a tool, given in OpenAI form
    (``{"type": "function", "function": {...}}``) or bare."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def format_tool_calls(calls: list[dict[str, Any]]) -> str:
    """Render calls the way the LFM2 chat template does; the inverse of ``parse_tool_calls``.

    Raises ``ValueError`` for names or argument keys that would not parse back.
    """
    rendered = []
    for call in calls:
        name = call["name"]
        if not all(part.isidentifier() and not keyword.iskeyword(part) for part in name.split(".")):
            raise ValueError(f"invalid tool name {name!r}")
        args = []
        for key, value in call["arguments"].items():
            if not key.isidentifier() or keyword.iskeyword(key):
                raise ValueError(f"invalid argument name {key!r} for tool {name!r}")
            args.append(f"{key}={_render_value(value)}")
        rendered.append(f"{name}({', '.join(args)})")
    return f"{TOOL_CALL_START}[{', '.join(rendered)}]{TOOL_CALL_END}"


def _render_value(value: Any) -> str:
    # bool and None first: json.dumps would write true/null, the template writes Python.
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def _error(raw: str, message: str, name: str | None = None) -> dict[str, Any]:
    return {"name": name, "arguments": {}, "error": message, "raw": raw}


def _guess_name(body: str) -> str | None:
    match = _LEADING_NAME.match(body)
    return match.group(1) if match else None


def _tool_name(tool: str | dict) -> str:
    return tool if isinstance(tool, str) else tool_function(tool)["name"]


def _parse_expression(body: str) -> ast.expr:
    # Models write paths like "C:\dir": don't warn on (or, under -W error, reject) "\d".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(body, mode="eval").body


def _parse_span(body: str) -> list[dict[str, Any]]:
    try:
        tree = _parse_expression(body)
    except _PARSE_ERRORS as exc:
        message = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
        message = f"invalid tool call syntax: {message.splitlines()[0]}"
        return [_error(body, message, _guess_name(body))]
    return _parse_calls(body, tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree])


def _bare_calls(body: str, names: set[str]) -> list[dict[str, Any]]:
    """Calls of a bare ``[f(x=1), g(y="a")]`` reply, or [] unless every element calls one of `names`."""
    if not (body.startswith("[") and body.endswith("]")):
        return []
    try:
        tree = _parse_expression(body)
    except _PARSE_ERRORS:
        return []
    if not isinstance(tree, ast.List) or not tree.elts:
        return []
    if not all(isinstance(node, ast.Call) and _dotted_name(node.func) in names for node in tree.elts):
        return []
    return _parse_calls(body, tree.elts)


def _parse_calls(body: str, nodes: list[ast.expr]) -> list[dict[str, Any]]:
    source = _Source(body)
    return [_parse_call(source.segment(node), node) for node in nodes]


class _Source:
    """Node source by offset arithmetic: ``ast.get_source_segment`` re-splits the whole
    source into lines for every node, which made a span of n calls cost O(n²)."""

    def __init__(self, text: str) -> None:
        # ast positions are UTF-8 byte columns; surrogatepass because ast accepted the text.
        self.data = text.encode("utf-8", "surrogatepass")
        self.line_starts = [0] + [m.end() for m in _LINE_BREAK.finditer(self.data)]

    def segment(self, node: ast.expr) -> str:
        start = self.line_starts[node.lineno - 1] + node.col_offset
        end = self.line_starts[node.end_lineno - 1] + node.end_col_offset
        return self.data[start:end].decode("utf-8", "surrogatepass")


def _parse_call(raw: str, node: ast.expr) -> dict[str, Any]:
    if not isinstance(node, ast.Call):
        return _error(raw, "expected a function call like name(arg=value)")
    name = _dotted_name(node.func)
    if name is None:
        return _error(raw, "function name must be an identifier or dotted identifier")
    if node.args:
        return _error(raw, "positional arguments are not supported; use keyword arguments", name)
    arguments: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            return _error(raw, "**kwargs unpacking is not supported", name)
        if kw.arg in arguments:
            return _error(raw, f"argument {kw.arg!r} given more than once", name)
        try:
            arguments[kw.arg] = _literal(kw.value)
        except _PARSE_ERRORS:
            return _error(raw, f"argument {kw.arg!r} is not a literal value", name)
    return {"name": name, "arguments": arguments}


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted_name(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


def _literal(node: ast.expr) -> Any:
    """``ast.literal_eval`` plus JSON's true/false/null, minus calls such as ``set()``."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking is not a literal")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.Constant, ast.UnaryOp, ast.BinOp)):
        return ast.literal_eval(node)
    raise ValueError(f"not a literal: {type(node).__name__}")
