"""Parse and render LFM2 "pythonic" tool calls.

LFM2 models emit tool calls as a Python-like list of keyword-argument calls
between special tokens::

    <|tool_call_start|>[get_weather(city="Paris"), search(q="x", limit=3)]<|tool_call_end|>

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


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Return every tool call in ``text`` as ``{"name": str, "arguments": dict}``.

    Invalid calls or spans are returned in place as
    ``{"name": str | None, "arguments": {}, "error": str, "raw": str}``, where
    ``raw`` is the call's source, or the span's content (without markers) when
    the whole span is unusable.
    """
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


def _parse_span(body: str) -> list[dict[str, Any]]:
    try:
        # Models write paths like "C:\dir": don't warn on (or, under -W error, reject) "\d".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(body, mode="eval").body
    except _PARSE_ERRORS as exc:
        message = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
        message = f"invalid tool call syntax: {message.splitlines()[0]}"
        return [_error(body, message, _guess_name(body))]
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    return [_parse_call(body, node) for node in nodes]


def _parse_call(body: str, node: ast.expr) -> dict[str, Any]:
    raw = ast.get_source_segment(body, node) or body
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
