"""The page: a Chat tab, an Extract tab, a Model tab, and the handlers behind them.

Handlers only call ``lfm_mlx`` through the shared ``Runtime``. Each browser tab (and each API client) has
its own conversation, keyed by Gradio's session hash; the model and tokenizer are shared. Every model
event (a chat turn, an extraction, a batch) runs as rows of the runtime's engine, beside the others; the
events share a pool of slots as large as the engine's batch, and more wait in Gradio's queue.

Every entry point checks its input before any model work, cheapest check first (no megabytes are
tokenized), and refuses with one clear line: a toast in the page, an error for an API client, and no
traceback in the log. The limits: a chat message (with the system prompt and tools) must fit what is
left of the context window (a rolling window makes room by dropping the oldest turns), and anything
longer than the longest token times the context is refused unread; a reply gets at most
``MAX_REPLY_TOKENS`` and what is left of the context; a document for extraction is at most
``MAX_DOCUMENT_CHARS`` characters (longer ones run for many minutes: split them and use the batch), a
schema at most ``MAX_SCHEMA_CHARS``, instructions at most ``MAX_INSTRUCTIONS_CHARS``; uploads at most
``MAX_UPLOAD_BYTES`` of UTF-8 text.
"""

from __future__ import annotations

import csv
import functools
import html
import inspect
import io
import json
import math
import queue
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from lfm_mlx.chat import ChatSession
from lfm_mlx.engine import Cancelled
from lfm_mlx.extract import DEFAULT_MAX_TOKENS as DEFAULT_EXTRACT_TOKENS
from lfm_mlx.extract import extract_many
from lfm_mlx.constrain import MAX_SCHEMA_CHARS
from lfm_mlx.generate import sampling_settings
from lfm_mlx.tokenizer import max_token_chars
from lfm_mlx.tools import TOOL_CALL_END, TOOL_CALL_START, parse_tool_calls, split_tool_calls

from . import MAX_REPLY_TOKENS, Busy, ChatState, Runtime, Sessions, run_turn

MAX_DOCUMENT_CHARS = 200_000  # about 50,000 tokens: a few chunks, not the 82 of a 2 MB paste
MAX_INSTRUCTIONS_CHARS = 10_000
MAX_UPLOAD_BYTES = 1_000_000
MAX_SHOWN_CALLS = 100  # tool calls listed in one box; a reply with thousands shows a count for the rest
TEXT_TYPES = [".txt", ".md", ".json", ".csv"]
# The sampling sliders' (minimum, maximum, step). Gradio refuses a slider value outside its range, so values
# from elsewhere (an imported chat's, the checkpoint's defaults) are clamped to it.
SLIDERS = dict(temperature=(0, 2, 0.05), top_p=(0, 1, 0.01), top_k=(0, 200, 1), min_p=(0, 1, 0.01),
               repetition_penalty=(1, 2, 0.01))
SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "assets" / "schemas"
TOAST_SECONDS = 5  # Gradio's toasts show on every tab: long enough to read, gone before they confuse another
FREE = dict(concurrency_limit=None)  # queued (so its messages show as toasts) but never waits for the model
PRIVATE = dict(api_visibility="private")
EXAMPLE_TOOLS = json.dumps([{
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}], indent=2)


def refuse(message: str) -> gr.Error:
    """A user error: shown to the user (a toast, or the API client's error); no traceback in the log."""
    return gr.Error(message, duration=TOAST_SECONDS, print_exception=False)


def stats_line(s: dict) -> str:
    end = {"length": " · hit max tokens", "stopped": " · stopped"}.get(s["finish"], "")
    return (f"TTFT {s['ttft_s'] * 1000:.0f} ms · {s['tokens']} tokens · {s['tps']:.1f} tok/s · "
            f"peak {s['peak_mb']:.0f} MB · {s['cached']}/{s['prompt']} prompt tokens cached{end}")


# --- rendering ---------------------------------------------------------------------------------------

def _tool_calls_message(calls: list[dict]) -> dict:
    """Parsed tool calls as one titled box; past MAX_SHOWN_CALLS, a count of the rest."""
    lines = [f"{c['name']}({', '.join(f'{k}={json.dumps(v)}' for k, v in c['arguments'].items())})"
             if "error" not in c else f"{c.get('raw', '')}  # {c['error']}" for c in calls[:MAX_SHOWN_CALLS]]
    if len(calls) > MAX_SHOWN_CALLS:
        lines.append(f"# … and {len(calls) - MAX_SHOWN_CALLS:,} more calls")
    names = ", ".join(dict.fromkeys(c["name"] or "?" for c in calls))
    title = f"Tool call: {names}" if len(calls) == 1 else f"Tool calls ({len(calls):,}): {names}"
    return dict(role="assistant", content="```python\n" + "\n".join(lines) + "\n```", metadata=dict(title=title))


def _reply_rows(content: str) -> list[dict]:
    """A reply as chatbot messages: its text, and its tool calls in boxes (consecutive calls share one);
    a call still streaming shows as raw text. Linear in the reply's length."""
    out: list[dict] = []
    calls: list[dict] = []
    for kind, segment in split_tool_calls(content):
        if kind == "tool_call" and segment.endswith(TOOL_CALL_END):
            calls += parse_tool_calls(segment)
            continue
        if kind == "text" and not segment.strip():
            continue
        if calls:
            out.append(_tool_calls_message(calls))
            calls = []
        if kind == "tool_call":
            body = segment.removeprefix(TOOL_CALL_START)
            out.append(dict(role="assistant", content=f"```\n{body}\n```",
                            metadata=dict(title="Tool call…", status="pending")))
        else:
            out.append(dict(role="assistant", content=segment))
    if calls:
        out.append(_tool_calls_message(calls))
    return out


@functools.lru_cache(maxsize=256)
def _saved_reply_rows(content: str) -> tuple[dict, ...]:
    """A finished reply's rows, parsed once: the whole chat is rendered again on every streamed update."""
    return tuple(_reply_rows(content))


def _assistant_messages(content: str, stats: Optional[dict], streaming: bool = False) -> list[dict]:
    """A reply's chatbot messages, with its stats line under them once it has finished."""
    out = _reply_rows(content) if streaming else [dict(row) for row in _saved_reply_rows(content)]
    if stats is not None:
        # The title says when the server sent it (UTC), so a browser test can measure how far the page lags.
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stats["at"])) + f"{stats['at'] % 1:.3f}"[1:] + "Z"
        line = f'<div class="reply-stats" title="finished at {at}">{stats_line(stats)}</div>'
        if out and "metadata" not in out[-1]:
            out[-1] = dict(out[-1], content=out[-1]["content"] + "\n\n" + line)
        else:
            out.append(dict(role="assistant", content=line))
    return out or [dict(role="assistant", content="…")]


def render(state: ChatState, pending: Optional[str] = None, partial: Optional[str] = None,
           upto: Optional[int] = None) -> list[dict]:
    """The chatbot's messages: the session's (the first ``upto``), plus a message not yet sent and a reply
    still streaming."""
    messages = list(state.session.messages)[:upto]
    if pending is not None:
        messages.append(dict(role="user", content=pending))
    rows, display = [], []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            new = _assistant_messages(m["content"], state.stats.get(i))
        elif m["role"] == "tool":
            new = [dict(role="user", content=f"**Tool result**\n```json\n{m['content']}\n```")]
        else:
            new = [dict(role="user", content=m["content"])]
        rows += new
        display += [i] * len(new)
    if partial is not None:
        new = _assistant_messages(partial + " ▌", None, streaming=True)
        rows += new
        display += [len(messages)] * len(new)
    state.display = display
    return rows


def slider_value(name: str, value: float) -> float:
    low, high, _ = SLIDERS[name]
    return min(max(value, low), high)


def slider(name: str, label: str, value: float) -> gr.Slider:
    low, high, step = SLIDERS[name]
    return gr.Slider(low, high, step=step, label=label, value=slider_value(name, value), elem_id=f"slider-{name}")


def meter(used: int, window: Optional[int]) -> str:
    """Context used of the KV window, and a note once the rolling window drops the oldest tokens."""
    if not window:
        return f'<div class="ctx-meter"><span>Context: {used:,} tokens (no limit)</span></div>'
    share = min(used / window, 1.0)
    note = ""
    if used > window:
        note = (f'<div class="ctx-note">Rolling window active: the model sees the first 4 and the last '
                f"{window - 4:,} tokens; older turns have slid out of view.</div>")
    return (f'<div class="ctx-meter"><div class="ctx-bar"><div style="width:{share:.1%}"></div></div>'
            f"<span>Context: {used:,} / {window:,} tokens ({share:.0%})</span>{note}</div>")


def session_meter(state: ChatState, live: Any = None) -> str:
    """The meter for a session; while a reply streams, ``live`` (its last response) counts its tokens."""
    used = live.prompt_tokens + live.generation_tokens if live is not None else state.session.context_tokens
    return meter(used, state.session.max_kv_size)


def model_panel(runtime: Runtime) -> str:
    i = runtime.info()
    rows = [("Model", i["name"]), ("Directory", f"`{i['directory']}`"), ("Quantization", i["quantization"]),
            ("Weights", f"{i['weights_mb']:,.1f} MB"), ("Layers", i["layers"]), ("Backend", i["backend"]),
            ("KV window", f"{i['max_kv_size']:,} tokens" if i["max_kv_size"] else "unbounded"),
            ("KV cache bits", i["kv_bits"] or "full precision"),
            ("Engine", f"{i['running']} running, {i['waiting']} waiting (up to {i['max_batch']} at once)"),
            ("MLX memory now", f"{i['active_mb']:,.0f} MB"), ("MLX peak (last run)", f"{i['peak_mb']:,.0f} MB"),
            ("Process peak RSS", f"{i['process_peak_mb']:,.0f} MB")]
    if i["note"]:
        rows.append(("Note", i["note"]))
    return "\n".join(f"- **{k}:** {v}" for k, v in rows)


def header_html(runtime: Runtime) -> str:
    info = runtime.info()
    return (f'<div class="app-header"><h1>LFM-MLX</h1><span>{html.escape(runtime.choice.name)} · '
            f"{info['quantization']} · {info['backend']}</span></div>")


KV_BITS = {"full precision": None, "8-bit": 8, "4-bit": 4}


def kv_bits_label(bits: Optional[int]) -> str:
    return next(label for label, value in KV_BITS.items() if value == bits)


def resolve_and_switch(runtime: Runtime, name: str, max_kv_size: Optional[int], kv_bits: Optional[int]
                       ) -> Iterator[str]:
    """Resolve ``name`` (downloading and converting a hub model once), then ``runtime.switch`` to it;
    yields what resolving says as it goes. A model that cannot be found or loaded is a refusal."""
    from lfm_mlx.resolve import resolve_model

    said: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict = {}

    def work() -> None:
        try:
            choice = resolve_model(None if name == "demo" else name, demo=name == "demo", log=said.put)
            said.put("⏳ Loading the weights…")
            runtime.switch(choice, max_kv_size, kv_bits)
        except Exception as e:  # a folder that is not a model, a failed download: said on the page
            outcome["error"] = e
        finally:
            said.put(None)

    threading.Thread(target=work, name="lfm-mlx-model-load", daemon=True).start()
    while (line := said.get()) is not None:
        yield line
    if "error" in outcome:
        error = outcome["error"]
        known = isinstance(error, (Busy, ConnectionError, OSError, ValueError))
        raise refuse(f"Could not load {name}: {'' if known else type(error).__name__ + ': '}{_sentence(error)}")


def demo_banner(runtime: Runtime) -> str:
    why = f" ({runtime.choice.note})" if runtime.choice.note else ""
    return (f'<div class="demo-banner">⚠️ <b>Demo model: its weights are random</b>{why}. Replies are '
            "word salad and extractions are placeholders: this shows the app working, not LFM2. Connect to "
            "the internet once, or pass <code>--model PATH_OR_HUB_ID</code>, to run LiquidAI/LFM2.5-350M.</div>")


# --- input checks -------------------------------------------------------------------------------------

def soft(outputs: int) -> Callable:
    """For UI handlers with ``outputs`` outputs: a refusal (gr.Error) becomes a warning toast and leaves every
    output as it was, instead of stamping "Error" on each of them. API endpoints raise, so clients get it."""
    unchanged = tuple(gr.skip() for _ in range(outputs)) if outputs > 1 else gr.skip()

    def wrap(fn: Callable) -> Callable:
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except gr.Error as e:
                    gr.Warning(e.message, duration=TOAST_SECONDS)
                    yield unchanged
            return stream

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error as e:
                gr.Warning(e.message, duration=TOAST_SECONDS)
                return unchanged
        return call
    return wrap


def _sentence(error: Exception) -> str:
    text = str(error)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _text(value: Any, what: str) -> str:
    """An optional text field: None is empty; anything but a string is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise refuse(f"{what} must be text, not {type(value).__name__}.")
    return value


def whole(value: Any, name: str, default: Optional[int] = None) -> Optional[int]:
    """A whole number from the page or an API client (None: ``default``)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise refuse(f"{name} must be a whole number, not {value!r}.")
    return int(value)


def extraction_budget(value: Any) -> int:
    """Max tokens per chunk of an extraction, from the page or an API client: capped at MAX_REPLY_TOKENS."""
    limit = whole(value, "max_tokens", default=DEFAULT_EXTRACT_TOKENS)
    if limit < 1:
        raise refuse(f"max_tokens must be at least 1, not {limit}.")
    return min(limit, MAX_REPLY_TOKENS)


class Progress:
    """Tokens an extraction has generated so far and their rate: its live status line."""

    def __init__(self) -> None:
        self.tokens = 0
        self.first: Optional[float] = None

    def results(self, batch: list) -> list[tuple[int, Any]]:
        """Count the batch's token counts; return its (index, Extraction) pairs."""
        for item in batch:
            if isinstance(item, int):
                self.first = self.first or time.monotonic()
                self.tokens += item
        return [item for item in batch if isinstance(item, tuple)]

    def __str__(self) -> str:
        if not self.tokens:
            return "reading the text"
        seconds = time.monotonic() - self.first
        return f"{self.tokens:,} tokens" + (f" · {self.tokens / seconds:.1f} tok/s" if seconds > 0.5 else "")


def parse_tools(text: Any) -> Optional[list]:
    text = _text(text, "Tool definitions")
    if not text.strip():
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise refuse(f"Tool definitions are not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.")
    except RecursionError:
        raise refuse("Tool definitions are nested too deeply.") from None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise refuse("Tool definitions must be a JSON list of objects (name, description, parameters).")
    return tools


def reply_room(runtime: Runtime, state: ChatState, message: Optional[str], preamble: str = "") -> int:
    """Tokens left for a reply once ``message`` (None: a retry) and the ``preamble`` (system prompt and
    tools) are in the context; refuses what cannot fit. A rolling window makes room by dropping the oldest
    turns, so there only the new input has to fit the window; without one, the whole conversation must
    fit the context the model was trained on."""
    if message is not None and not isinstance(message, str):
        raise refuse(f"The message must be text, not {type(message).__name__}.")
    if message is not None and not message.strip():
        raise refuse("The message is empty: type something first.")
    context = runtime.context
    size = len(message or "") + len(preamble)
    most = max_token_chars(runtime.tokenizer) * context  # more characters than that many tokens can hold
    if size > most:
        raise refuse(f"The message{' with the system prompt and tools' if preamble else ''} is {size:,} characters, "
                     f"more than the {context:,}-token context can hold. For long documents use the Extract tab, "
                     "which splits them.")
    used = 0 if runtime.max_kv_size else state.session.context_tokens
    new = runtime.count_tokens(message or "") + runtime.count_tokens(preamble)
    if used + new >= context:
        where = f"the {context:,}-token context window" if not used else \
            f"the {context - used:,} tokens left of the {context:,}-token context (clear the chat to start over)"
        raise refuse(f"The message{' with the system prompt and tools' if preamble else ''} is {new:,} tokens; "
                     f"it does not fit {where}. For long documents use the Extract tab, which splits them.")
    return context - used - new


def sampling_options(runtime: Runtime, room: int, temperature, top_p, top_k, min_p, repetition_penalty,
                     max_tokens, seed) -> dict:
    """The reply's options, each value checked as the library checks it (a bad one is refused by name);
    max_tokens capped by the context left (``room``) and MAX_REPLY_TOKENS."""
    values = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                  repetition_penalty=repetition_penalty)
    try:
        sampling_settings(runtime.sampling_defaults, **values).check_vocabulary(runtime.model.args.vocab_size)
    except ValueError as e:
        raise refuse(f"Sampling: {e}.") from None
    requested = whole(max_tokens, "max_tokens", default=512)
    if requested < 1:
        raise refuse(f"max_tokens must be at least 1, not {requested}.")
    seed = whole(seed, "seed")
    return dict(values, max_tokens=min(requested, MAX_REPLY_TOKENS, room),
                seed=None if seed is None or seed < 0 else seed)


def read_upload(path: Optional[str], kind: str = "file") -> str:
    """Text of an uploaded file, or a clear error for a wrong type, a binary or an oversized file."""
    if not path:
        raise refuse(f"No {kind} uploaded.")
    p = Path(path)
    if p.suffix.lower() not in TEXT_TYPES:
        raise refuse(f"{p.name}: unsupported file type; upload {', '.join(TEXT_TYPES)}.")
    size = p.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise refuse(f"{p.name} is {size / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 1e6:.0f} MB.")
    data = p.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse(f"{p.name} looks binary (not UTF-8 text); upload a text file.") from None


def load_chat(runtime: Runtime, file: Any) -> ChatSession:
    """An exported conversation from an upload, or one line saying what is wrong with it."""
    if file is None:
        raise refuse("No file uploaded.")
    path = Path(file if isinstance(file, str) else file.name)
    read_upload(str(path), "conversation")  # the type, size and binary checks
    try:
        return ChatSession.load(path, runtime.model, runtime.tokenizer, defaults=runtime.sampling_defaults)
    except ValueError as e:
        raise refuse(f"Could not import: {e}") from None
    except RecursionError:
        raise refuse(f"Could not import: {path.name} is nested too deeply to be a saved chat.") from None


# --- extraction helpers -------------------------------------------------------------------------------

def load_presets() -> dict[str, dict]:
    """assets/schemas/NAME.json (a JSON Schema) with its sample text NAME.txt, by name."""
    presets = {}
    for path in sorted(SCHEMAS_DIR.glob("*.json")):
        sample = path.with_suffix(".txt")
        presets[path.stem] = dict(schema=json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2,
                                                    ensure_ascii=False),
                                  sample=sample.read_text(encoding="utf-8") if sample.is_file() else "")
    return presets


def parse_schema(text: Any) -> dict:
    from lfm_mlx.constrain import SchemaError, check_schema

    text = _text(text, "The schema")
    if len(text) > MAX_SCHEMA_CHARS:
        raise refuse(f"The schema is {len(text):,} characters; the limit is {MAX_SCHEMA_CHARS:,}.")
    if not text.strip():
        raise refuse("The schema is empty: pick a preset or write a JSON Schema.")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise refuse(f"The schema is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.")
    except RecursionError:
        raise refuse("The schema is nested too deeply.") from None
    try:
        return check_schema(schema)
    except SchemaError as e:
        raise refuse(f"Schema problem: {e}") from None
    except RecursionError:
        raise refuse("The schema is nested too deeply.") from None


def check_document(text: Any, name: str = "The source text") -> str:
    text = _text(text, name)
    if not text.strip():
        raise refuse(f"{name} is empty: paste text or upload a file.")
    if len(text) > MAX_DOCUMENT_CHARS:
        raise refuse(f"{name} is {len(text):,} characters; the limit is {MAX_DOCUMENT_CHARS:,} characters "
                     "(about 50,000 tokens). Split it into smaller files and use the batch.")
    return text


def check_instructions(text: Any) -> Optional[str]:
    text = _text(text, "The instructions")
    if len(text) > MAX_INSTRUCTIONS_CHARS:
        raise refuse(f"The instructions are {len(text):,} characters; the limit is {MAX_INSTRUCTIONS_CHARS:,}.")
    return text.strip() or None


def highlights(text: str, spans: dict) -> list[tuple[str, Optional[str]]]:
    """The source cut into (text, label) pieces; labels are JSON paths without indices."""
    marks = sorted((s[0], s[1], _label(p)) for p, s in spans.items() if s)
    out, pos = [], 0
    for start, end, label in marks:
        if start < pos:
            continue  # overlaps the previous highlight
        out += [(text[pos:start], None), (text[start:end], label)]
        pos = end
    out.append((text[pos:], None))
    return [piece for piece in out if piece[0]]


BATCH_HEADERS = ["file", "result", "data / error"]
HIGHLIGHT_COLOURS = ("#fde68a", "#bbf7d0", "#bfdbfe", "#fbcfe8", "#ddd6fe", "#fed7aa", "#a5f3fc", "#e9d5ff")


def highlighted_html(text: str, spans: dict) -> str:
    """The source exactly as written (line breaks, blank lines, whole words), each found value marked
    with its field's colour and path, and a legend of the fields. Gradio's HighlightedText lays pieces out
    as boxes, which breaks words and drops blank lines."""
    pieces = highlights(text, spans)
    labels = list(dict.fromkeys(label for _, label in pieces if label))
    colour = {label: HIGHLIGHT_COLOURS[i % len(HIGHLIGHT_COLOURS)] for i, label in enumerate(labels)}
    body = "".join(html.escape(piece) if label is None else
                   f'<mark style="background:{colour[label]}" title="{html.escape(label)}">{html.escape(piece)}</mark>'
                   for piece, label in pieces)
    legend = "".join(f'<span class="field" style="background:{colour[label]}">{html.escape(label)}</span>'
                     for label in labels) or '<span class="none">no extracted value found in the source</span>'
    return f'<div class="legend">{legend}</div><div class="source">{body}</div>'


def _label(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path).removeprefix("$.")


def array_fields(data: Any, path: str = "") -> dict[str, list]:
    """Every array in the result (nested too), by path: what the table view can show."""
    found = {}
    if isinstance(data, dict):
        for k, v in data.items():
            found.update(array_fields(v, f"{path}.{k}" if path else k))
    elif isinstance(data, list):
        found[path or "(root)"] = data
    return found


def table(rows: list) -> list[list]:
    if rows and all(isinstance(r, dict) for r in rows):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
    return [["value" if rows else "(no items)"]] + [[_cell(r)] for r in rows]


def _cell(v: Any) -> str:
    return "" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def write_downloads(name: str, records: list[tuple[str, Any]]) -> list[str]:
    """JSON, JSONL and CSV files of (source name, data) records, in a fresh temporary directory."""
    folder = Path(tempfile.mkdtemp(prefix="lfm-mlx-extract-"))
    single = len(records) == 1
    (folder / f"{name}.json").write_text(json.dumps(records[0][1] if single else dict(records), indent=2,
                                                    ensure_ascii=False), encoding="utf-8")
    (folder / f"{name}.jsonl").write_text("".join(json.dumps({"source": s, "data": d}, ensure_ascii=False) + "\n"
                                                  for s, d in records), encoding="utf-8")
    keys = list(dict.fromkeys(k for _, d in records if isinstance(d, dict) for k in d))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["source", *keys])
    for s, d in records:
        writer.writerow([s, *(_cell(d.get(k)) if isinstance(d, dict) else "" for k in keys)])
    (folder / f"{name}.csv").write_text(buffer.getvalue(), encoding="utf-8")
    return [str(folder / f"{name}.{ext}") for ext in ("json", "jsonl", "csv")]
# --- the page ------------------------------------------------------------------------------------------

def build(runtime: Runtime, can_switch: bool = True) -> gr.Blocks:
    """The page. ``can_switch``: the Model tab may load another model (off when the app listens beyond
    this machine: a switch ends everyone's running requests)."""
    sessions = Sessions(runtime)
    # Model events share one pool of slots, as many as the engine's rows; more wait in Gradio's queue.
    model_event = dict(concurrency_limit=runtime.engine.max_batch, concurrency_id="model")
    d = runtime.sampling_defaults
    presets = load_presets()
    first = next(iter(presets), None)

    with gr.Blocks(title="LFM-MLX", analytics_enabled=False) as page:
        header = gr.HTML(header_html(runtime))
        banner = gr.HTML(demo_banner(runtime), elem_id="demo-banner", visible=runtime.choice.demo)

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(height=540, editable="user", elem_id="chatbot", show_label=False,
                                             buttons=["copy", "copy_all"], feedback_options=None,
                                             placeholder="Ask anything. Replies stream here with their stats.")
                        with gr.Row(equal_height=True):
                            # lines=1: Gradio sends on Enter only from a one-line box (it still grows to max_lines)
                            message = gr.Textbox(show_label=False, placeholder="Message (Enter sends, Shift+Enter: new line)",
                                                 lines=1, max_lines=10, scale=6, elem_id="message", autofocus=True)
                            send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                            stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                        context = gr.HTML(meter(0, runtime.max_kv_size), elem_id="context")
                        with gr.Row():
                            retry_btn = gr.Button("↻ Retry", size="sm", elem_id="retry")
                            undo_btn = gr.Button("↶ Undo", size="sm", elem_id="undo")
                            clear_btn = gr.Button("Clear", size="sm", elem_id="clear")
                            export_btn = gr.Button("Export JSON", size="sm", elem_id="export")
                            import_btn = gr.UploadButton("Import JSON", size="sm", file_types=[".json"], elem_id="import")
                        export_file = gr.File(label="Exported conversation", visible=False, elem_id="export-file")
                        gr.Markdown("✎ Editing an earlier message rewrites the conversation from there: the turns "
                                    "after it are replaced (export the chat first to keep them).", elem_id="edit-hint")
                    with gr.Column(scale=1, min_width=280):
                        system = gr.Textbox(label="System prompt", lines=3, placeholder="You are a helpful assistant.",
                                            elem_id="system")
                        with gr.Accordion("Sampling", open=True):
                            temperature = slider("temperature", "Temperature", d.temperature)
                            top_p = slider("top_p", "Top-p", d.top_p)
                            top_k = slider("top_k", "Top-k (0: off)", d.top_k)
                            min_p = slider("min_p", "Min-p", d.min_p)
                            repetition = slider("repetition_penalty", "Repetition penalty", d.repetition_penalty)
                            # No minimum or maximum: Gradio's own refusal of them would print a traceback.
                            max_tokens = gr.Number(value=512, precision=0, label=f"Max tokens (up to {MAX_REPLY_TOKENS:,})",
                                                   elem_id="max-tokens")
                            seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                        with gr.Accordion("Tools", open=False):
                            tools = gr.Code(value="", language="json", label="Tools (JSON list)", lines=6)
                            example_tools = gr.Button("Insert example tool", size="sm")
                            as_tool = gr.Checkbox(label="Send my next message as a tool result", value=False)

            with gr.Tab("Extract", id="extract"):
                with gr.Row(equal_height=False):
                    with gr.Column():
                        preset = gr.Dropdown(list(presets), value=first, label="Preset (schema + sample text)",
                                             elem_id="preset")
                        source = gr.Textbox(label="Source text", lines=14, max_lines=24, elem_id="source",
                                            value=presets[first]["sample"] if first else "")
                        upload = gr.File(label=f"…or upload a text file (.txt .md .json .csv, up to {MAX_DOCUMENT_CHARS:,} "
                                               "characters)",
                                         file_types=TEXT_TYPES, height=130, elem_id="upload")
                    with gr.Column():
                        schema = gr.Code(value=presets[first]["schema"] if first else "", language="json",
                                         label="JSON Schema", lines=16, max_lines=24, elem_id="schema")
                        schema_status = gr.Markdown(elem_id="schema-status")
                        with gr.Row():
                            instructions = gr.Textbox(label="Instructions (optional)", lines=1, scale=3)
                            extract_tokens = gr.Number(value=DEFAULT_EXTRACT_TOKENS, precision=0, minimum=1,
                                                       maximum=MAX_REPLY_TOKENS, scale=1, elem_id="extract-max-tokens",
                                                       label=f"Max tokens per chunk (up to {MAX_REPLY_TOKENS:,})")
                        with gr.Row():
                            extract_btn = gr.Button("Extract", variant="primary", scale=3, elem_id="extract-run")
                            extract_stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="extract-stop")
                extract_status = gr.Markdown(elem_id="extract-status")
                with gr.Row(equal_height=False):
                    result_json = gr.JSON(label="Extracted JSON", elem_id="result-json", height=420)
                    with gr.Column():
                        gr.Markdown("**Source with extracted values highlighted**")
                        grounded = gr.HTML(elem_id="grounded")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2):
                        array_pick = gr.Dropdown([], label="Array field", interactive=True)
                        array_table = gr.Dataframe(label="Array as a table", wrap=True, interactive=False, elem_id="array-table",
                                                   headers=["(extract to see the arrays)"], value=[])
                    downloads = gr.File(label="Downloads (JSON, JSONL, CSV)", file_count="multiple", scale=1)
                last_result = gr.State(None)
                with gr.Accordion("Batch: extract from several files", open=False, elem_id="batch"):
                    batch_files = gr.File(label="Text files", file_count="multiple", file_types=TEXT_TYPES, elem_id="batch-files")
                    with gr.Row():
                        batch_btn = gr.Button("Extract from all files", variant="primary", scale=3, elem_id="batch-run")
                        batch_stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="batch-stop")
                    batch_status = gr.Markdown(elem_id="batch-status")
                    batch_table = gr.Dataframe(label="Results", wrap=True, interactive=False, elem_id="batch-table",
                                               headers=BATCH_HEADERS, value=[])
                    batch_downloads = gr.File(label="Batch downloads (JSON, JSONL, CSV)", file_count="multiple",
                                              elem_id="batch-downloads")

            with gr.Tab("Model", id="model"):
                with gr.Row(equal_height=True):
                    model_name = gr.Textbox(value=runtime.choice.name, scale=4, elem_id="model-name",
                                            label="Model: a local directory, a Hugging Face hub id, or demo",
                                            interactive=can_switch)
                    kv_window = gr.Number(value=runtime.max_kv_size or 0, precision=0, scale=1, elem_id="kv-window",
                                          label="KV window (tokens; 0: unbounded)", interactive=can_switch)
                    kv_bits = gr.Dropdown(list(KV_BITS), value=kv_bits_label(runtime.kv_bits), scale=1,
                                          label="KV cache", elem_id="kv-bits", interactive=can_switch)
                    load_btn = gr.Button("Load", variant="primary", scale=1, elem_id="model-load",
                                         interactive=can_switch)
                load_status = gr.Markdown("" if can_switch else "Loading another model from the page is off: the app "
                                          "listens beyond this machine. Restart it with `--model`.",
                                          elem_id="model-status")
                panel = gr.Markdown(model_panel(runtime), elem_id="model-panel")
                refresh = gr.Button("Refresh", size="sm")

        settings = [system, tools, as_tool, temperature, top_p, top_k, min_p, repetition, max_tokens, seed]
        chat_out = [chatbot, message, context]

        # --- chat handlers ---
        def configure(state: ChatState, message: Optional[str], system_text, tools_text, tool_role,
                      *sampling) -> tuple[dict, str]:
            """Check the message and the side panel, then apply the panel to the session; the reply's
            options and the role to send as."""
            system_text, tools_text = _text(system_text, "The system prompt"), _text(tools_text, "Tool definitions")
            tool_list = parse_tools(tools_text)
            room = reply_room(runtime, state, message, preamble=system_text + tools_text)
            options = sampling_options(runtime, room, *sampling)
            state.session.system = system_text.strip() or None
            state.session.tools = tool_list
            state.session.sampling = {name: options[name] for name in SLIDERS}  # what an export records
            return options, "tool" if tool_role else "user"

        def turn(state: ChatState, start) -> Iterator[tuple[str, Any]]:
            """``run_turn``, with what the session refuses (a lone surrogate, nothing to regenerate, a turn
            still running) as a refusal."""
            try:
                yield from run_turn(runtime, state, start)
            except (Busy, ValueError) as e:
                raise refuse(_sentence(e)) from None

        def stream(state: ChatState, start, preview: list[dict]) -> Iterator[tuple]:
            preview = preview + [dict(role="assistant", content="*Waiting for the model…*")]
            yield preview, gr.skip(), session_meter(state)
            try:
                shown = None
                for reply, last in turn(state, start):
                    if last is shown:  # a heartbeat: nothing new to send
                        yield gr.skip(), gr.skip(), gr.skip()
                        continue
                    shown = last
                    yield render(state, partial=reply), gr.skip(), session_meter(state, last)
            except gr.Error as e:
                gr.Warning(e.message, duration=TOAST_SECONDS)
            yield render(state), gr.skip(), session_meter(state)

        # Gradio passes the request (and EditData) by annotation; the rest are `settings`, in order.
        @soft(3)
        def send(request: gr.Request, text, *settings):
            state = sessions.get(request)
            options, role = configure(state, text, *settings)
            updates = stream(state, lambda s, cancel: s.send(text, role=role, cancel=cancel, **options),
                             render(state, pending=text))
            rows, _, ctx = next(updates)
            yield rows, "", ctx  # the message leaves the textbox once
            yield from updates

        @soft(3)
        def retry(request: gr.Request, *settings):
            state = sessions.get(request)
            if not state.session.messages:
                raise refuse("Nothing to retry: the conversation is empty.")
            options, _ = configure(state, None, *settings)
            kept = len(state.session.messages)
            while kept and state.session.messages[kept - 1]["role"] == "assistant":
                kept -= 1
            yield from stream(state, lambda s, cancel: s.regenerate(cancel=cancel, **options), render(state, upto=kept))

        @soft(3)
        def edit(request: gr.Request, edited: gr.EditData, *settings):
            state = sessions.get(request)
            index = state.display[edited.index] if edited.index < len(state.display) else -1
            messages = state.session.messages
            if index < 0 or messages[index]["role"] != "user":
                raise refuse("Only your own messages can be edited.")
            text = edited.value if isinstance(edited.value, str) else str(edited.value)
            options, _ = configure(state, text, *settings)
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")

            if index < last_user:
                later = len(messages) - index - 1
                gr.Info(f"Editing message {index + 1} replaced the {later} later messages.", duration=TOAST_SECONDS)

            def start(s: ChatSession, cancel):
                if index == last_user:
                    return s.edit_last(text, cancel=cancel, **options)  # everything before it stays cached
                while len(s.messages) > index:
                    s.undo()
                return s.send(text, cancel=cancel, **options)

            yield from stream(state, start, render(state, pending=text, upto=index))

        def stop(request: gr.Request):
            state = sessions.get(request)
            state.stop.set()
            state.idle.wait(5)
            return render(state), session_meter(state)

        @soft(3)
        def undo(request: gr.Request):
            state = sessions.get(request)
            state.idle.wait(10)
            users = [m["content"] for m in state.session.messages if m["role"] == "user"]
            state.session.undo()
            state.forget_stats_from(len(state.session.messages))
            return render(state), (users[-1] if users else ""), session_meter(state)

        @soft(3)
        def clear(request: gr.Request):
            state = sessions.get(request)
            state.idle.wait(10)
            old, state.session = state.session, runtime.new_session()
            state.stats.clear()
            runtime.submit(old.reset)  # its arrays are freed on the engine's thread
            return [], "", session_meter(state), gr.File(value=None, visible=False)

        @soft(1)
        def export(request: gr.Request):
            state = sessions.get(request)
            if not state.session.messages:
                raise refuse("Nothing to export yet.")
            path = Path(tempfile.mkdtemp(prefix="lfm-mlx-chat-")) / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
            try:
                state.session.save(path)
            except ValueError as e:
                raise refuse(f"Could not export: {e}") from None
            return gr.File(value=str(path), visible=True)

        @soft(9)
        def import_chat(file, request: gr.Request):
            state = sessions.get(request)
            loaded = load_chat(runtime, file)
            state.idle.wait(10)
            old, state.session = state.session, runtime.new_session(system=loaded.system, tools=loaded.tools)
            state.session.messages = loaded.messages  # the next message prefills them once
            state.stats.clear()
            runtime.submit(old.reset)
            s = {**d.to_dict(), **(loaded.sampling or {})}
            clamped = [name for name in SLIDERS if slider_value(name, s[name]) != s[name]]
            if clamped:
                gr.Warning(f"Imported {', '.join(clamped)} outside the sliders' ranges: set to the nearest end.", duration=TOAST_SECONDS)
            return (render(state), session_meter(state), loaded.system or "",
                    json.dumps(loaded.tools, indent=2) if loaded.tools else "",
                    *(slider_value(name, s[name]) for name in SLIDERS))

        # No progress timers: the streaming reply is the progress, and timers on the chatbot and its neighbours
        # keep the browser's main thread busy enough to lag behind a fast stream.
        quiet = dict(show_progress="hidden")
        chat_events = [
            send_btn.click(send, [message, *settings], chat_out, **model_event, **PRIVATE, **quiet),
            message.submit(send, [message, *settings], chat_out, **model_event, **PRIVATE, **quiet),
            retry_btn.click(retry, settings, chat_out, **model_event, **PRIVATE, **quiet),
            chatbot.retry(retry, settings, chat_out, **model_event, **PRIVATE, **quiet),
            chatbot.edit(edit, settings, chat_out, **model_event, **PRIVATE, **quiet),
        ]
        for event in chat_events:
            event.then(lambda: model_panel(runtime), None, panel, queue=False, **PRIVATE)
        stop_btn.click(stop, None, [chatbot, context], cancels=chat_events, queue=False, **PRIVATE)
        undo_btn.click(undo, None, chat_out, **FREE, **PRIVATE)
        chatbot.undo(undo, None, chat_out, **FREE, **PRIVATE)
        clear_btn.click(clear, None, [*chat_out, export_file], **FREE, **PRIVATE)
        chatbot.clear(clear, None, [*chat_out, export_file], **FREE, **PRIVATE)
        export_btn.click(export, None, export_file, **FREE, **PRIVATE)
        import_btn.upload(import_chat, import_btn, [chatbot, context, system, tools, temperature, top_p, top_k,
                                                     min_p, repetition], **FREE, **PRIVATE)
        example_tools.click(lambda: EXAMPLE_TOOLS, None, tools, queue=False, **PRIVATE)
        refresh.click(lambda: model_panel(runtime), None, panel, queue=False, **PRIVATE)

        def load_model(name: Any, window: Any, bits: Any) -> Iterator[tuple]:
            """Find (download, convert) and load the model while the current one serves, then swap."""
            unchanged = (gr.skip(),) * 3
            if not can_switch:
                raise refuse("Loading another model from the page is off while the app listens beyond this machine.")
            name = _text(name, "The model").strip()
            window = whole(window, "The KV window", default=0)
            if not name:
                raise refuse("Name a model: a local directory, a Hugging Face hub id, or demo.")
            if window < 0 or 0 < window <= 64:
                raise refuse("The KV window must be 0 (unbounded) or more than 64 tokens.")
            if bits not in KV_BITS:
                raise refuse(f"KV cache: choose one of {', '.join(KV_BITS)}.")
            lines = [f"⏳ Loading {name}…"]
            yield "\n\n".join(lines), *unchanged
            try:
                for line in resolve_and_switch(runtime, name, window or None, KV_BITS[bits]):
                    lines.append(line)
                    yield "\n\n".join(lines), *unchanged
            except gr.Error as e:
                yield "\n\n".join([*lines, f"✗ {e.message}"]), *unchanged
                raise
            lines.append(f"✓ Loaded {runtime.choice.name}. Conversations start over on it.")
            yield "\n\n".join(lines), header_html(runtime), gr.HTML(demo_banner(runtime), visible=runtime.choice.demo), \
                model_panel(runtime)

        load_btn.click(soft(4)(load_model), [model_name, kv_window, kv_bits], [load_status, header, banner, panel],
                       **PRIVATE)

        def forget(request: gr.Request):
            runtime.submit(sessions.drop, request)  # its arrays are freed on the engine's thread

        page.unload(forget)

        # --- extraction handlers ---
        def extraction(texts: list[str], schema: dict, instructions: Optional[str], max_tokens: int,
                       cancel: threading.Event) -> Iterator[list]:
            """``extract_many`` as rows of the engine, beside chats: batches of (index, result) as texts
            finish and of token counts as they are generated (``Progress`` tells them apart), ``[]`` as
            a heartbeat. Closing it, or setting ``cancel``, ends its rows within a step
            (then ``Cancelled`` is raised if it is still being read). A text the library cannot read (a
            lone surrogate, say) gives a failed result, not an exception."""
            def produce(emit: Callable) -> None:
                extract_many(runtime.model, runtime.tokenizer, texts, schema, instructions=instructions,
                             max_tokens=max_tokens, progress=False, engine=runtime.engine, cancel=cancel,
                             on_result=lambda i, result: emit((i, result)), on_tokens=emit)
            return runtime.stream(produce, cancel)

        def cancel_event(request: gr.Request, kind: str) -> threading.Event:
            """A new cancel event for this session's extraction of ``kind``, which its Stop button sets."""
            event = threading.Event()
            sessions.get(request).extractions[kind] = event
            return event

        def stopper(kind: str) -> Callable:
            def stop_extraction(request: gr.Request):
                event = sessions.get(request).extractions.get(kind)
                if event is not None:
                    event.set()
            return stop_extraction

        def check(schema_text: str) -> str:
            try:
                parse_schema(schema_text)
            except gr.Error as e:
                return f"✗ {e.message}"
            return "✓ Schema is valid and supported."

        def schema_edited(schema_text: str, preset_name: Optional[str], result: Any):
            """Check the schema; a preset whose schema this no longer is is unselected, and a result
            shown for another schema says so."""
            stale = "The schema changed: the result below is from the previous one. Extract again to update it."
            return (check(schema_text),
                    gr.skip() if preset_name in presets and presets[preset_name]["schema"] == schema_text
                    else gr.Dropdown(value=None),
                    stale if result is not None else gr.skip())

        def pick_preset(name: str):
            p = presets.get(name)
            if p is None:
                return gr.skip(), gr.skip(), gr.skip()
            return p["schema"], p["sample"], check(p["schema"])

        @soft(1)
        def read_source(file):
            return check_document(read_upload(file, "source file"), Path(file).name) if file else gr.skip()

        @soft(7)
        def run_extract(request: gr.Request, text: str, schema_text: str, instructions_text: str, max_tokens):
            parsed, text = parse_schema(schema_text), check_document(text)
            instructions, limit = check_instructions(instructions_text), extraction_budget(max_tokens)
            cancel = cancel_event(request, "extract")
            unchanged = (gr.skip(),) * 6
            progress, result = Progress(), None
            yield ("⏳ Extracting… reading the text", *unchanged)
            try:
                for batch in extraction([text], parsed, instructions, limit, cancel):
                    for _, result in progress.results(batch):
                        pass
                    yield (gr.skip() if result else f"⏳ Extracting… {progress}", *unchanged)
            except Cancelled:
                yield (f"Stopped after {progress}.", *unchanged)
                return
            finally:  # the client left, or the run ended: either way its rows leave the engine
                cancel.set()
            arrays = array_fields(result.data)
            s = result.stats
            found = sum(1 for span in result.spans.values() if span)
            status = (f"{'✓ valid' if result.valid else '✗ ' + (result.error or 'invalid')} · "
                      f"{found}/{len(result.spans)} string values found in the source · {s.generation_tokens} tokens · "
                      f"{s.generation_tps:.1f} tok/s · TTFT {s.ttft_s * 1000:.0f} ms"
                      + (f" · long text: {result.chunks} chunks merged" if result.chunked else "")
                      + (f" · ⚠ closed early by the {limit:,}-token budget: raise Max tokens for a fuller result"
                         if result.closed_by_budget else ""))
            pick = next(iter(arrays), None)
            rows = table(arrays[pick]) if pick else [["(no array in the result)"]]
            yield (status, result.data, highlighted_html(text, result.spans),
                   gr.Dropdown(choices=list(arrays), value=pick), gr.Dataframe(value=rows[1:], headers=rows[0]),
                   write_downloads("extraction", [("source", result.data)]), result.data)

        def show_array(name: str, data: Any):
            rows = table(array_fields(data).get(name, [])) if name else [["(no array in the result)"]]
            return gr.Dataframe(value=rows[1:], headers=rows[0])

        @soft(3)
        def run_batch(request: gr.Request, files, schema_text: str, instructions_text: str, max_tokens):
            parsed, instructions = parse_schema(schema_text), check_instructions(instructions_text)
            limit = extraction_budget(max_tokens)
            if not files:
                raise refuse("Upload one or more text files first.")
            names, texts, skipped = [], [], []
            for f in files:
                name = Path(f).name
                try:
                    texts.append(check_document(read_upload(f), name))
                    names.append(name)
                except gr.Error as e:
                    skipped.append([name, "skipped", e.message])
            results: dict = {}  # index in texts → Extraction, as each finishes

            def results_table():
                rows = [[names[i], ("valid" if r.valid else "invalid") + (" (closed by the budget)" if r.closed_by_budget
                                                                         else ""),
                         r.error or json.dumps(r.data, ensure_ascii=False)[:200]] for i, r in sorted(results.items())]
                return gr.Dataframe(value=rows + skipped, headers=BATCH_HEADERS)

            cancel = cancel_event(request, "batch")
            progress = Progress()
            yield f"⏳ Extracting from {len(texts)} files…", results_table(), None
            try:
                for batch in extraction(texts, parsed, instructions, limit, cancel):
                    finished = progress.results(batch)
                    results.update(finished)
                    yield (f"⏳ {len(results)} of {len(texts)} files done · {progress}…",
                           results_table() if finished else gr.skip(), gr.skip())
                status = f"{sum(r.valid for r in results.values())} of {len(files)} files gave valid JSON."
            except Cancelled:  # what finished before Stop is kept, shown and downloadable
                status = f"Stopped: {len(results)} of {len(texts)} files finished."
            finally:
                cancel.set()
            records = [(names[i], r.data) for i, r in sorted(results.items())]
            yield status, results_table(), write_downloads("batch", records) if records else None

        preset.change(pick_preset, preset, [schema, source, schema_status], queue=False, **PRIVATE)
        schema.change(schema_edited, [schema, preset, last_result], [schema_status, preset, extract_status], queue=False,
                      trigger_mode="always_last", **PRIVATE)
        upload.upload(read_source, upload, source, **FREE, **PRIVATE)
        extract_btn.click(run_extract, [source, schema, instructions, extract_tokens],
                          [extract_status, result_json, grounded, array_pick, array_table, downloads, last_result],
                          **model_event, **PRIVATE)
        extract_stop_btn.click(stopper("extract"), None, None, queue=False, **PRIVATE)
        array_pick.change(show_array, [array_pick, last_result], array_table, queue=False, **PRIVATE)
        batch_btn.click(run_batch, [batch_files, schema, instructions, extract_tokens],
                        [batch_status, batch_table, batch_downloads],
                        **model_event, **PRIVATE)
        batch_stop_btn.click(stopper("batch"), None, None, queue=False, **PRIVATE)
        page.load(lambda: check(presets[first]["schema"]) if first else "", None, schema_status, queue=False, **PRIVATE)

        # --- API for scripts (gradio_client) ---
        def chat(message: str, system_prompt: str = "", temperature: float = d.temperature, top_p: float = d.top_p,
                 top_k: int = d.top_k, min_p: float = d.min_p, repetition_penalty: float = d.repetition_penalty,
                 max_tokens: int = 512, seed: int = -1, tools_json: str = "", role: str = "user",
                 request: gr.Request = None) -> Iterator[str]:
            """Send a message in this client's conversation; streams the reply so far. max_tokens is capped
            at 4096 and at what is left of the context."""
            state = sessions.get(request)
            if role not in ("user", "tool"):
                raise refuse('role must be "user" or "tool".')
            options, _ = configure(state, message, system_prompt, tools_json, role == "tool", temperature, top_p,
                                   top_k, min_p, repetition_penalty, max_tokens, seed)
            reply = ""
            for reply, _ in turn(state, lambda s, cancel: s.send(message, role=role, cancel=cancel, **options)):
                yield reply
            yield reply

        def history(request: gr.Request = None) -> dict:
            """This client's conversation, context use and the last reply's stats."""
            state = sessions.get(request)
            s = state.session
            last = max((i for i, m in enumerate(s.messages) if m["role"] == "assistant"), default=None)
            return dict(messages=s.history, context_tokens=s.context_tokens, max_kv_size=s.max_kv_size,
                        window_active=s.window_active, last_stats=state.stats.get(last))

        def reset(request: gr.Request = None) -> str:
            """Start this client's conversation over."""
            clear(request)
            return "ok"

        def extract_api(text: str, schema_json: str, instructions: str = "", max_tokens: int = 1024
                        ) -> Iterator[Optional[dict]]:
            """Extract the JSON that schema_json describes from text (at most 200,000 characters); yields
            None while it runs, then the extracted object. max_tokens (per chunk) is capped at 4096."""
            parsed, text = parse_schema(schema_json), check_document(text)
            limit = extraction_budget(max_tokens)
            cancel = threading.Event()
            try:
                for batch in extraction([text], parsed, check_instructions(instructions), limit, cancel):
                    finished = Progress().results(batch)
                    if not finished:
                        yield None  # a heartbeat: how Gradio notices a client that left
                        continue
                    result = finished[0][1]
                    if result.data is None:
                        raise refuse(f"Extraction failed: {result.error}")
                    yield result.data
            finally:
                cancel.set()

        def model_info() -> dict:
            """The model panel: name, path, quantization, weights size, backend, engine load, memory."""
            return runtime.info()

        gr.api(chat, api_name="chat", **model_event)
        gr.api(history, api_name="history", queue=False)
        gr.api(reset, api_name="reset", queue=False)
        gr.api(extract_api, api_name="extract", **model_event)
        gr.api(model_info, api_name="model_info", queue=False)
    return page
