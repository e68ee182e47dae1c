"""What every handler of the page shares: input checks that refuse in one line, and event options.

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

import functools
import inspect
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr

from lfm_mlx.chat import ChatSession
from lfm_mlx.constrain import MAX_SCHEMA_CHARS
from lfm_mlx.extract import DEFAULT_MAX_TOKENS as DEFAULT_EXTRACT_TOKENS
from lfm_mlx.generate import sampling_settings
from lfm_mlx.tokenizer import max_token_chars

from .runtime import MAX_REPLY_TOKENS, Runtime
from .sessions import ChatState

MAX_DOCUMENT_CHARS = 200_000  # about 50,000 tokens: a few chunks, not the 82 of a 2 MB paste
MAX_INSTRUCTIONS_CHARS = 10_000
MAX_UPLOAD_BYTES = 1_000_000
TEXT_TYPES = [".txt", ".md", ".json", ".csv"]
TOAST_SECONDS = 5  # Gradio's toasts show on every tab: long enough to read, gone before they confuse another
FREE = dict(concurrency_limit=None)  # queued (so its messages show as toasts) but never waits for the model
PRIVATE = dict(api_visibility="private")


def refuse(message: str) -> gr.Error:
    """A user error: shown to the user (a toast, or the API client's error); no traceback in the log."""
    return gr.Error(message, duration=TOAST_SECONDS, print_exception=False)


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


def as_sentence(error: Exception) -> str:
    text = str(error)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def text_field(value: Any, what: str) -> str:
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


def parse_tools(text: Any) -> Optional[list]:
    text = text_field(text, "Tool definitions")
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


def parse_schema(text: Any) -> dict:
    from lfm_mlx.constrain import SchemaError, check_schema

    text = text_field(text, "The schema")
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
    text = text_field(text, name)
    if not text.strip():
        raise refuse(f"{name} is empty: paste text or upload a file.")
    if len(text) > MAX_DOCUMENT_CHARS:
        raise refuse(f"{name} is {len(text):,} characters; the limit is {MAX_DOCUMENT_CHARS:,} characters "
                     "(about 50,000 tokens). Split it into smaller files and use the batch.")
    return text


def check_instructions(text: Any) -> Optional[str]:
    text = text_field(text, "The instructions")
    if len(text) > MAX_INSTRUCTIONS_CHARS:
        raise refuse(f"The instructions are {len(text):,} characters; the limit is {MAX_INSTRUCTIONS_CHARS:,}.")
    return text.strip() or None
