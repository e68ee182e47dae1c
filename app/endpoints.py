"""The page's API for scripts (``gradio_client``): chat in a per-client conversation, its history and
reset, extraction, and the model panel. The same checks and limits as the page; errors go to the client."""

from __future__ import annotations

import threading
from typing import Iterator, Optional

import gradio as gr

from .chat_tab import configure, new_conversation, turn
from .extract_tab import Progress, extraction
from .inputs import check_document, check_instructions, extraction_budget, parse_schema, refuse
from .runtime import Runtime
from .sessions import Sessions


def add_endpoints(runtime: Runtime, sessions: Sessions, model_event: dict) -> None:
    """Declare the endpoints (inside the page's ``gr.Blocks``)."""
    d = runtime.sampling_defaults

    def chat(message: str, system_prompt: str = "", temperature: float = d.temperature, top_p: float = d.top_p,
             top_k: int = d.top_k, min_p: float = d.min_p, repetition_penalty: float = d.repetition_penalty,
             max_tokens: int = 512, seed: int = -1, tools_json: str = "", role: str = "user",
             request: gr.Request = None) -> Iterator[str]:
        """Send a message in this client's conversation; streams the reply so far. max_tokens is capped
        at 4096 and at what is left of the context."""
        state = sessions.get(request)
        if role not in ("user", "tool"):
            raise refuse('role must be "user" or "tool".')
        options, _ = configure(runtime, state, message, system_prompt, tools_json, role == "tool", temperature, top_p,
                               top_k, min_p, repetition_penalty, max_tokens, seed)
        reply = ""
        for reply, _ in turn(runtime, state, lambda s, cancel: s.send(message, role=role, cancel=cancel, **options)):
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
        new_conversation(runtime, sessions.get(request))
        return "ok"

    def extract_api(text: str, schema_json: str, instructions: str = "", max_tokens: int = 1024
                    ) -> Iterator[Optional[dict]]:
        """Extract the JSON that schema_json describes from text (at most 200,000 characters); yields
        None while it runs, then the extracted object. max_tokens (per chunk) is capped at 4096."""
        parsed, text = parse_schema(schema_json), check_document(text)
        limit = extraction_budget(max_tokens)
        cancel = threading.Event()
        try:
            for batch in extraction(runtime, [text], parsed, check_instructions(instructions), limit, cancel):
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
