"""The page: a Chat tab, an Extract tab, a Model tab, and the handlers behind them.

Handlers only call ``lfm_mlx`` through the shared ``Runtime``. Each browser tab (and each API client) has
its own conversation, keyed by Gradio's session hash; the model and tokenizer are shared. Events that
run the model share one concurrency slot, so requests from different sessions queue.
"""

from __future__ import annotations

import csv
import functools
import inspect
import io
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from lfm_mlx.chat import ChatSession
from lfm_mlx.tools import TOOL_CALL_END, TOOL_CALL_START, parse_tool_calls, split_tool_calls

from . import ChatState, Runtime, Sessions, run_turn

MAX_MESSAGE_CHARS = 1_000_000
MAX_UPLOAD_BYTES = 1_000_000
TEXT_TYPES = [".txt", ".md", ".json", ".csv"]
SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "assets" / "schemas"
MODEL_EVENT = dict(concurrency_limit=1, concurrency_id="model")
FREE = dict(concurrency_limit=None)  # queued (so its messages show as toasts) but never waits for the model
PRIVATE = dict(api_visibility="private")
EXAMPLE_TOOLS = json.dumps([{
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}], indent=2)


def stats_line(s: dict) -> str:
    end = {"length": " · hit max tokens", "stopped": " · stopped"}.get(s["finish"], "")
    return (f"TTFT {s['ttft_s'] * 1000:.0f} ms · {s['tokens']} tokens · {s['tps']:.1f} tok/s · "
            f"peak {s['peak_mb']:.0f} MB · {s['cached']}/{s['prompt']} prompt tokens cached{end}")


# --- rendering ---------------------------------------------------------------------------------------

def _tool_call_message(segment: str) -> dict:
    """A tool call as its own titled box: the parsed calls, or the raw text while it still streams."""
    if not segment.endswith(TOOL_CALL_END):
        body = segment.removeprefix(TOOL_CALL_START)
        return dict(role="assistant", content=f"```\n{body}\n```", metadata=dict(title="Tool call…", status="pending"))
    calls = parse_tool_calls(segment)
    lines = [f"{c['name']}({', '.join(f'{k}={json.dumps(v)}' for k, v in c['arguments'].items())})"
             if "error" not in c else f"{c.get('raw', '')}  # {c['error']}" for c in calls]
    names = ", ".join(c["name"] or "?" for c in calls)
    return dict(role="assistant", content="```python\n" + "\n".join(lines) + "\n```",
                metadata=dict(title=f"Tool call: {names}"))


def _assistant_messages(content: str, stats: Optional[dict]) -> list[dict]:
    out = []
    for kind, segment in split_tool_calls(content):
        if kind == "tool_call":
            out.append(_tool_call_message(segment))
        elif segment.strip():
            out.append(dict(role="assistant", content=segment))
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
        new = _assistant_messages(partial + " ▌", None)
        rows += new
        display += [len(messages)] * len(new)
    state.display = display
    return rows


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
            ("KV cache bits", i["kv_bits"] or "full precision"), ("MLX memory now", f"{i['active_mb']:,.0f} MB"),
            ("MLX peak (last run)", f"{i['peak_mb']:,.0f} MB"), ("Process peak RSS", f"{i['process_peak_mb']:,.0f} MB")]
    if i["note"]:
        rows.append(("Note", i["note"]))
    return "| Model panel | |\n|---|---|\n" + "\n".join(f"| **{k}** | {v} |" for k, v in rows)


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
                    gr.Warning(e.message, duration=10)
                    yield unchanged
            return stream

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except gr.Error as e:
                gr.Warning(e.message, duration=10)
                return unchanged
        return call
    return wrap


def parse_tools(text: str) -> Optional[list]:
    if not text or not text.strip():
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise gr.Error(f"Tool definitions are not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.")
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise gr.Error("Tool definitions must be a JSON list of objects (name, description, parameters).")
    return tools


def sampling_kwargs(temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, seed) -> dict:
    return dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), min_p=float(min_p),
                repetition_penalty=float(repetition_penalty), max_tokens=max(1, int(max_tokens)),
                seed=None if seed is None or int(seed) < 0 else int(seed))


def check_message(runtime: Runtime, state: ChatState, message: str) -> None:
    """Refuse what cannot be sent; warn when the message alone overflows the context window."""
    if not isinstance(message, str) or not message.strip():
        raise gr.Error("The message is empty: type something first.")
    if len(message) > MAX_MESSAGE_CHARS:
        raise gr.Error(f"The message is {len(message):,} characters; the limit is {MAX_MESSAGE_CHARS:,}. "
                       "For long documents use the Extract tab, which splits them into chunks.")
    window = state.session.max_kv_size
    if window and len(message) > window:  # a token is at least one character: count only when it can matter
        n = len(runtime.tokenizer.encode(message, add_special_tokens=False))
        if n > window:
            gr.Warning(f"Your message is {n:,} tokens, more than the {window:,}-token context. It is sent with "
                       f"the rolling window on: the model keeps the first 4 tokens and sees only the last "
                       f"{window - 4:,}.", duration=15)


def read_upload(path: Optional[str], kind: str = "file") -> str:
    """Text of an uploaded file, or a clear error for a wrong type, a binary or an oversized file."""
    if not path:
        raise gr.Error(f"No {kind} uploaded.")
    p = Path(path)
    if p.suffix.lower() not in TEXT_TYPES:
        raise gr.Error(f"{p.name}: unsupported file type; upload {', '.join(TEXT_TYPES)}.")
    size = p.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise gr.Error(f"{p.name} is {size / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 1e6:.0f} MB.")
    data = p.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise gr.Error(f"{p.name} looks binary (not UTF-8 text); upload a text file.") from None


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


def parse_schema(text: str) -> dict:
    from lfm_mlx.constrain import SchemaError, check_schema

    if not text or not text.strip():
        raise gr.Error("The schema is empty: pick a preset or write a JSON Schema.")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise gr.Error(f"The schema is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.")
    try:
        return check_schema(schema)
    except SchemaError as e:
        raise gr.Error(f"Schema problem: {e}") from None


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
    return [["value"]] + [[_cell(r)] for r in rows]


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

def build(runtime: Runtime) -> gr.Blocks:
    from lfm_mlx.extract import extract

    sessions = Sessions(runtime)
    d = runtime.model.sampling_defaults
    presets = load_presets()
    first = next(iter(presets), None)

    with gr.Blocks(title="LFM-MLX", analytics_enabled=False) as page:
        gr.HTML(f'<div class="app-header"><h1>LFM-MLX</h1><span>{runtime.choice.name} · '
                f"{runtime.info()['quantization']} · {runtime.info()['backend']}</span></div>")
        if runtime.choice.demo:
            gr.HTML(demo_banner(runtime), elem_id="demo-banner")

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(height=540, editable="user", elem_id="chatbot", show_label=False,
                                             buttons=["copy", "copy_all"], feedback_options=None,
                                             placeholder="Ask anything. Replies stream here with their stats.")
                        with gr.Row(equal_height=True):
                            message = gr.Textbox(show_label=False, placeholder="Message (Enter sends, Shift+Enter: new line)",
                                                 lines=2, max_lines=10, scale=6, elem_id="message", autofocus=True)
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
                    with gr.Column(scale=1, min_width=280):
                        system = gr.Textbox(label="System prompt", lines=3, placeholder="You are a helpful assistant.",
                                            elem_id="system")
                        with gr.Accordion("Sampling", open=True):
                            temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature")
                            top_p = gr.Slider(0, 1, value=d.top_p, step=0.01, label="Top-p")
                            top_k = gr.Slider(0, 200, value=d.top_k, step=1, label="Top-k (0: off)")
                            min_p = gr.Slider(0, 1, value=d.min_p, step=0.01, label="Min-p")
                            repetition = gr.Slider(1, 2, value=d.repetition_penalty, step=0.01, label="Repetition penalty")
                            max_tokens = gr.Number(value=512, minimum=1, maximum=32768, precision=0, label="Max tokens",
                                                   elem_id="max-tokens")
                            seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                        with gr.Accordion("Tools", open=False):
                            tools = gr.Code(value="", language="json", label="Tool definitions (JSON list)", lines=6)
                            example_tools = gr.Button("Insert example tool", size="sm")
                            as_tool = gr.Checkbox(label="Send my next message as a tool result", value=False)

            with gr.Tab("Extract", id="extract"):
                with gr.Row(equal_height=False):
                    with gr.Column():
                        preset = gr.Dropdown(list(presets), value=first, label="Preset (schema + sample text)",
                                             elem_id="preset")
                        source = gr.Textbox(label="Source text", lines=14, max_lines=24, elem_id="source",
                                            value=presets[first]["sample"] if first else "")
                        upload = gr.File(label="…or upload a text file (.txt .md .json .csv, up to 1 MB)",
                                         file_types=TEXT_TYPES, height=130, elem_id="upload")
                    with gr.Column():
                        schema = gr.Code(value=presets[first]["schema"] if first else "", language="json",
                                         label="JSON Schema", lines=16, max_lines=24, elem_id="schema")
                        schema_status = gr.Markdown(elem_id="schema-status")
                        instructions = gr.Textbox(label="Instructions (optional)", lines=1)
                        extract_btn = gr.Button("Extract", variant="primary", elem_id="extract-run")
                extract_status = gr.Markdown(elem_id="extract-status")
                with gr.Row(equal_height=False):
                    result_json = gr.JSON(label="Extracted JSON", elem_id="result-json", height=420)
                    grounded = gr.HighlightedText(label="Source with extracted values highlighted", elem_id="grounded",
                                                  combine_adjacent=False, show_legend=True)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2):
                        array_pick = gr.Dropdown([], label="Array field", interactive=True)
                        array_table = gr.Dataframe(label="Array as a table", wrap=True, interactive=False, elem_id="array-table")
                    downloads = gr.File(label="Downloads (JSON, JSONL, CSV)", file_count="multiple", scale=1)
                last_result = gr.State(None)
                with gr.Accordion("Batch: extract from several files", open=False, elem_id="batch"):
                    batch_files = gr.File(label="Text files", file_count="multiple", file_types=TEXT_TYPES, elem_id="batch-files")
                    batch_btn = gr.Button("Extract from all files", variant="primary", elem_id="batch-run")
                    batch_status = gr.Markdown(elem_id="batch-status")
                    batch_table = gr.Dataframe(label="Results", wrap=True, interactive=False, elem_id="batch-table")
                    batch_downloads = gr.File(label="Batch downloads (JSON, JSONL, CSV)", file_count="multiple")

            with gr.Tab("Model", id="model"):
                panel = gr.Markdown(model_panel(runtime), elem_id="model-panel")
                refresh = gr.Button("Refresh", size="sm")

        settings = [system, tools, as_tool, temperature, top_p, top_k, min_p, repetition, max_tokens, seed]
        chat_out = [chatbot, message, context]

        # --- chat handlers ---
        def configure(state: ChatState, system_text, tools_text, tool_role, *sampling) -> tuple[dict, str]:
            """Apply the side panel to the session; the sampling options and the role to send as."""
            state.session.system = (system_text or "").strip() or None
            state.session.tools = parse_tools(tools_text)
            return sampling_kwargs(*sampling), "tool" if tool_role else "user"

        def stream(state: ChatState, start, preview: list[dict]) -> Iterator[tuple]:
            preview = preview + [dict(role="assistant", content="*Waiting for the model…*")]
            yield preview, gr.skip(), session_meter(state)
            try:
                started = False
                for reply, last in run_turn(runtime, state, start):
                    started = started or last is not None
                    rows = render(state, partial=reply) if started else preview
                    yield rows, gr.skip(), session_meter(state, last)
            except ValueError as e:  # the session refused (nothing to regenerate, …)
                gr.Warning(str(e))
            yield render(state), gr.skip(), session_meter(state)

        # Gradio passes the request (and EditData) by annotation; the rest are `settings`, in order.
        @soft(3)
        def send(request: gr.Request, text, *settings):
            state = sessions.get(request)
            check_message(runtime, state, text)
            options, role = configure(state, *settings)
            updates = stream(state, lambda s: s.send(text, role=role, **options), render(state, pending=text))
            rows, _, ctx = next(updates)
            yield rows, "", ctx  # the message leaves the textbox once
            yield from updates

        @soft(3)
        def retry(request: gr.Request, *settings):
            state = sessions.get(request)
            if not state.session.messages:
                raise gr.Error("Nothing to retry: the conversation is empty.")
            options, _ = configure(state, *settings)
            kept = len(state.session.messages)
            while kept and state.session.messages[kept - 1]["role"] == "assistant":
                kept -= 1
            yield from stream(state, lambda s: s.regenerate(**options), render(state, upto=kept))

        @soft(3)
        def edit(request: gr.Request, edited: gr.EditData, *settings):
            state = sessions.get(request)
            index = state.display[edited.index] if edited.index < len(state.display) else -1
            messages = state.session.messages
            if index < 0 or messages[index]["role"] != "user":
                raise gr.Error("Only your own messages can be edited.")
            text = edited.value if isinstance(edited.value, str) else str(edited.value)
            check_message(runtime, state, text)
            options, _ = configure(state, *settings)
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")

            def start(s: ChatSession):
                if index == last_user:
                    return s.edit_last(text, **options)  # everything before it stays cached
                while len(s.messages) > index:
                    s.undo()
                return s.send(text, **options)

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
            return render(state), (users[-1] if users else ""), session_meter(state)

        @soft(3)
        def clear(request: gr.Request):
            state = sessions.get(request)
            state.idle.wait(10)
            old, state.session = state.session, ChatSession(runtime.model, runtime.tokenizer,
                                                            max_kv_size=runtime.max_kv_size, kv_bits=runtime.kv_bits)
            state.stats.clear()
            runtime.submit(old.reset)  # its arrays are freed on the model thread
            return [], "", session_meter(state)

        @soft(1)
        def export(request: gr.Request):
            state = sessions.get(request)
            if not state.session.messages:
                raise gr.Error("Nothing to export yet.")
            path = Path(tempfile.mkdtemp(prefix="lfm-mlx-chat-")) / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
            state.session.save(path)
            return gr.File(value=str(path), visible=True)

        @soft(9)
        def import_chat(file, request: gr.Request):
            state = sessions.get(request)
            if file is None:
                raise gr.Error("No file uploaded.")
            path = Path(file if isinstance(file, str) else file.name)
            read_upload(str(path), "conversation")  # the type, size and binary checks
            try:
                loaded = ChatSession.load(path, runtime.model, runtime.tokenizer)
            except ValueError as e:
                raise gr.Error(f"Could not import: {e}") from None
            state.idle.wait(10)
            old, state.session = state.session, ChatSession(
                runtime.model, runtime.tokenizer, system=loaded.system, tools=loaded.tools,
                max_kv_size=runtime.max_kv_size, kv_bits=runtime.kv_bits)
            state.session.messages = loaded.messages  # the next message prefills them once
            state.stats.clear()
            runtime.submit(old.reset)
            s = {**d.to_dict(), **(loaded.sampling or {})}
            return (render(state), session_meter(state), loaded.system or "",
                    json.dumps(loaded.tools, indent=2) if loaded.tools else "",
                    s["temperature"], s["top_p"], s["top_k"], s["min_p"], s["repetition_penalty"])

        # No progress timers: the streaming reply is the progress, and timers on the chatbot and its neighbours
        # keep the browser's main thread busy enough to lag behind a fast stream.
        quiet = dict(show_progress="hidden")
        chat_events = [
            send_btn.click(send, [message, *settings], chat_out, **MODEL_EVENT, **PRIVATE, **quiet),
            message.submit(send, [message, *settings], chat_out, **MODEL_EVENT, **PRIVATE, **quiet),
            retry_btn.click(retry, settings, [chatbot, message, context], **MODEL_EVENT, **PRIVATE, **quiet),
            chatbot.retry(retry, settings, [chatbot, message, context], **MODEL_EVENT, **PRIVATE, **quiet),
            chatbot.edit(edit, settings, [chatbot, message, context], **MODEL_EVENT, **PRIVATE, **quiet),
        ]
        for event in chat_events:
            event.then(lambda: model_panel(runtime), None, panel, queue=False, **PRIVATE)
        stop_btn.click(stop, None, [chatbot, context], cancels=chat_events, queue=False, **PRIVATE)
        undo_btn.click(undo, None, [chatbot, message, context], **FREE, **PRIVATE)
        chatbot.undo(undo, None, [chatbot, message, context], **FREE, **PRIVATE)
        clear_btn.click(clear, None, [chatbot, message, context], **FREE, **PRIVATE)
        chatbot.clear(clear, None, [chatbot, message, context], **FREE, **PRIVATE)
        export_btn.click(export, None, export_file, **FREE, **PRIVATE)
        import_btn.upload(import_chat, import_btn, [chatbot, context, system, tools, temperature, top_p, top_k,
                                                     min_p, repetition], **FREE, **PRIVATE)
        example_tools.click(lambda: EXAMPLE_TOOLS, None, tools, queue=False, **PRIVATE)
        refresh.click(lambda: model_panel(runtime), None, panel, queue=False, **PRIVATE)

        def forget(request: gr.Request):
            runtime.submit(sessions.drop, request)  # its arrays are freed on the model thread

        page.unload(forget)

        # --- extraction handlers ---
        def check(schema_text: str) -> str:
            try:
                parse_schema(schema_text)
            except gr.Error as e:
                return f"✗ {e.message}"
            return "✓ Schema is valid and supported."

        def pick_preset(name: str):
            p = presets.get(name)
            if p is None:
                return gr.skip(), gr.skip(), gr.skip()
            return p["schema"], p["sample"], check(p["schema"])

        @soft(1)
        def read_source(file):
            return read_upload(file, "source file") if file else gr.skip()

        @soft(7)
        def run_extract(text: str, schema_text: str, instructions_text: str):
            parsed = parse_schema(schema_text)
            if not text or not text.strip():
                raise gr.Error("The source text is empty: paste text or upload a file.")
            result = runtime.call(extract, runtime.model, runtime.tokenizer, text, parsed,
                                  instructions=instructions_text or None)
            arrays = array_fields(result.data)
            s = result.stats
            found = sum(1 for span in result.spans.values() if span)
            status = (f"{'✓ valid' if result.valid else '✗ ' + (result.error or 'invalid')} · "
                      f"{found}/{len(result.spans)} string values found in the source · {s.generation_tokens} tokens · "
                      f"{s.generation_tps:.1f} tok/s · TTFT {s.ttft_s * 1000:.0f} ms"
                      + (f" · long text: {result.chunks} chunks merged" if result.chunked else ""))
            pick = next(iter(arrays), None)
            rows = table(arrays[pick]) if pick else [["value"]]
            return (status, result.data, highlights(text, result.spans),
                    gr.Dropdown(choices=list(arrays), value=pick), gr.Dataframe(value=rows[1:], headers=rows[0]),
                    write_downloads("extraction", [("source", result.data)]), result.data)

        def show_array(name: str, data: Any):
            rows = table(array_fields(data).get(name, [])) if name else [["value"]]
            return gr.Dataframe(value=rows[1:], headers=rows[0])

        @soft(3)
        def run_batch(files, schema_text: str, instructions_text: str, progress=gr.Progress()):
            from lfm_mlx.extract import extract_many

            parsed = parse_schema(schema_text)
            if not files:
                raise gr.Error("Upload one or more text files first.")
            names, texts, rows = [], [], []
            for f in files:
                name = Path(f).name
                try:
                    texts.append(read_upload(f))
                    names.append(name)
                except gr.Error as e:
                    rows.append([name, "skipped", e.message])
            results, step = [], 4
            progress(0, desc="Extracting")
            for i in range(0, len(texts), step):
                results += runtime.call(extract_many, runtime.model, runtime.tokenizer, texts[i:i + step], parsed,
                                        instructions=instructions_text or None, progress=False)
                progress(min(i + step, len(texts)) / len(texts), desc=f"{min(i + step, len(texts))}/{len(texts)} files")
            rows = [[n, "valid" if r.valid else "invalid", r.error or json.dumps(r.data, ensure_ascii=False)[:200]]
                    for n, r in zip(names, results)] + rows
            ok = sum(r.valid for r in results)
            files_out = write_downloads("batch", [(n, r.data) for n, r in zip(names, results)]) if results else None
            return (f"{ok} of {len(files)} files gave valid JSON.", gr.Dataframe(value=rows, headers=["file", "result", "data / error"]),
                    files_out)

        preset.change(pick_preset, preset, [schema, source, schema_status], queue=False, **PRIVATE)
        schema.change(check, schema, schema_status, queue=False, trigger_mode="always_last", **PRIVATE)
        upload.upload(read_source, upload, source, **FREE, **PRIVATE)
        extract_btn.click(run_extract, [source, schema, instructions],
                          [extract_status, result_json, grounded, array_pick, array_table, downloads, last_result],
                          **MODEL_EVENT, **PRIVATE)
        array_pick.change(show_array, [array_pick, last_result], array_table, queue=False, **PRIVATE)
        batch_btn.click(run_batch, [batch_files, schema, instructions], [batch_status, batch_table, batch_downloads],
                        **MODEL_EVENT, **PRIVATE)
        page.load(lambda: check(presets[first]["schema"]) if first else "", None, schema_status, queue=False, **PRIVATE)

        # --- API for scripts (gradio_client) ---
        def chat(message: str, system_prompt: str = "", temperature: float = d.temperature, top_p: float = d.top_p,
                 top_k: int = d.top_k, min_p: float = d.min_p, repetition_penalty: float = d.repetition_penalty,
                 max_tokens: int = 512, seed: int = -1, tools_json: str = "", role: str = "user",
                 request: gr.Request = None) -> Iterator[str]:
            """Send a message in this client's conversation; streams the reply so far."""
            state = sessions.get(request)
            check_message(runtime, state, message)
            if role not in ("user", "tool"):
                raise gr.Error('role must be "user" or "tool".')
            options, _ = configure(state, system_prompt, tools_json, role == "tool", temperature, top_p, top_k,
                                   min_p, repetition_penalty, max_tokens, seed)
            reply = ""
            for reply, _ in run_turn(runtime, state, lambda s: s.send(message, role=role, **options)):
                yield reply
            yield reply

        def history(request: gr.Request = None) -> dict:
            """This client's conversation, context use and the last reply's stats."""
            state = sessions.get(request)
            s = state.session
            last = max(state.stats) if state.stats else None
            return dict(messages=s.history, context_tokens=s.context_tokens, max_kv_size=s.max_kv_size,
                        window_active=s.window_active, last_stats=state.stats.get(last))

        def reset(request: gr.Request = None) -> str:
            """Start this client's conversation over."""
            clear(request)
            return "ok"

        def extract_api(text: str, schema_json: str, instructions: str = "", max_tokens: int = 1024) -> dict:
            """Extract the JSON that schema_json describes from text; returns the extracted object."""
            parsed = parse_schema(schema_json)
            if not isinstance(text, str) or not text.strip():
                raise gr.Error("The source text is empty.")
            result = runtime.call(extract, runtime.model, runtime.tokenizer, text, parsed,
                                  instructions=instructions or None, max_tokens=max(1, int(max_tokens)))
            if result.data is None:
                raise gr.Error(f"Extraction failed: {result.error}")
            return result.data

        def model_info() -> dict:
            """The model panel: name, path, quantization, weights size, backend, memory."""
            return runtime.info()

        gr.api(chat, api_name="chat", **MODEL_EVENT)
        gr.api(history, api_name="history", queue=False)
        gr.api(reset, api_name="reset", queue=False)
        gr.api(extract_api, api_name="extract", **MODEL_EVENT)
        gr.api(model_info, api_name="model_info", queue=False)
    return page
