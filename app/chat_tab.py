"""The Chat tab: one conversation per session, streamed into the chatbot with its stats, a side panel
of system prompt, sampling and tools, and retry / undo / edit / clear / export / import."""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import gradio as gr

from lfm_mlx.chat import ChatSession
from lfm_mlx.tools import TOOL_CALL_END, TOOL_CALL_START, parse_tool_calls, split_tool_calls

from .inputs import (FREE, PRIVATE, TOAST_SECONDS, as_sentence, load_chat, parse_tools, refuse, reply_room,
                     sampling_options, soft, text_field)
from .runtime import MAX_REPLY_TOKENS, Busy, Runtime
from .sessions import ChatState, Sessions, run_turn

MAX_SHOWN_CALLS = 100  # tool calls listed in one box; a reply with thousands shows a count for the rest
# The sampling sliders' (minimum, maximum, step). Gradio refuses a slider value outside its range, so values
# from elsewhere (an imported chat's, the checkpoint's defaults) are clamped to it.
SLIDERS = dict(temperature=(0, 2, 0.05), top_p=(0, 1, 0.01), top_k=(0, 200, 1), min_p=(0, 1, 0.01),
               repetition_penalty=(1, 2, 0.01))
EXAMPLE_TOOLS = json.dumps([{
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}], indent=2)


def stats_line(s: dict) -> str:
    end = {"length": " · hit max tokens", "stopped": " · stopped"}.get(s["finish"], "")
    return (f"TTFT {s['ttft_s'] * 1000:.0f} ms · {s['tokens']} tokens · {s['tps']:.1f} tok/s · "
            f"peak {s['peak_mb']:.0f} MB · {s['cached']}/{s['prompt']} prompt tokens cached{end}")


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


# --- what the tab and the API share ---------------------------------------------------------------------

def configure(runtime: Runtime, state: ChatState, message: Optional[str], system_text, tools_text, tool_role,
              *sampling) -> tuple[dict, str]:
    """Check the message and the side panel, then apply the panel to the session; the reply's
    options and the role to send as."""
    system_text, tools_text = text_field(system_text, "The system prompt"), text_field(tools_text, "Tool definitions")
    tool_list = parse_tools(tools_text)
    room = reply_room(runtime, state, message, preamble=system_text + tools_text)
    options = sampling_options(runtime, room, *sampling)
    state.session.system = system_text.strip() or None
    state.session.tools = tool_list
    state.session.sampling = {name: options[name] for name in SLIDERS}  # what an export records
    return options, "tool" if tool_role else "user"

def turn(runtime: Runtime, state: ChatState, start) -> Iterator[tuple[str, Any]]:
    """``run_turn``, with what the session refuses (a lone surrogate, nothing to regenerate, a turn
    still running) as a refusal."""
    try:
        yield from run_turn(runtime, state, start)
    except (Busy, ValueError) as e:
        raise refuse(as_sentence(e)) from None


def new_conversation(runtime: Runtime, state: ChatState) -> None:
    """Start the session's conversation over (once its turn has ended); the old one's arrays are freed on
    the engine's thread."""
    state.idle.wait(10)
    old, state.session = state.session, runtime.new_session()
    state.stats.clear()
    runtime.submit(old.reset)


# --- the tab --------------------------------------------------------------------------------------------

def chat_tab(runtime: Runtime, sessions: Sessions, model_event: dict) -> list:
    """Build the tab (inside the page's ``gr.Tabs``) and its handlers; returns the events that run a turn."""
    d = runtime.sampling_defaults
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
                    cancels_sent = gr.State(0)  # Stop bumps it to cancel queued messages when no reply runs
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

    settings = [system, tools, as_tool, temperature, top_p, top_k, min_p, repetition, max_tokens, seed]
    chat_out = [chatbot, message, context]

    def stream(state: ChatState, start, preview: list[dict]) -> Iterator[tuple]:
        preview = preview + [dict(role="assistant", content="*Waiting for the model…*")]
        yield preview, gr.skip(), session_meter(state)
        try:
            shown = None
            for reply, last in turn(runtime, state, start):
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
        options, role = configure(runtime, state, text, *settings)
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
        options, _ = configure(runtime, state, None, *settings)
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
        options, _ = configure(runtime, state, text, *settings)
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

    def stop(request: gr.Request, cancels_sent: int):
        """Stop this session's reply. A running turn ends within a step and renders its own end: cancelling
        its event instead could let that event's last update reach the page after the stop's and hide the
        reply's stats. Only when no turn runs does Stop cancel the events, dropping a message still queued."""
        state = sessions.get(request)
        if not state.idle.is_set():
            state.stop.set()
            return gr.skip()
        return cancels_sent + 1

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
        new_conversation(runtime, state)
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
    stop_btn.click(stop, cancels_sent, cancels_sent, queue=False, **PRIVATE)
    cancels_sent.change(None, None, None, cancels=chat_events, queue=False, **PRIVATE)
    undo_btn.click(undo, None, chat_out, **FREE, **PRIVATE)
    chatbot.undo(undo, None, chat_out, **FREE, **PRIVATE)
    clear_btn.click(clear, None, [*chat_out, export_file], **FREE, **PRIVATE)
    chatbot.clear(clear, None, [*chat_out, export_file], **FREE, **PRIVATE)
    export_btn.click(export, None, export_file, **FREE, **PRIVATE)
    import_btn.upload(import_chat, import_btn, [chatbot, context, system, tools, temperature, top_p, top_k,
                                                 min_p, repetition], **FREE, **PRIVATE)
    example_tools.click(lambda: EXAMPLE_TOOLS, None, tools, queue=False, **PRIVATE)
    return chat_events
