"""The page: a Chat tab, an Extract tab, a Model tab (each in its own module) and the API for scripts.

Handlers only call ``lfm_mlx`` through the shared ``Runtime``. Each browser tab (and each API client) has
its own conversation, keyed by Gradio's session hash; the model and tokenizer are shared. Every model
event (a chat turn, an extraction, a batch) runs as rows of the runtime's engine, beside the others; the
events share a pool of slots as large as the engine's batch, and more wait in Gradio's queue. What the
handlers accept is in ``app/inputs.py``.
"""

from __future__ import annotations

import gradio as gr

from .chat_tab import chat_tab
from .endpoints import add_endpoints
from .extract_tab import extract_tab
from .inputs import PRIVATE
from .model_tab import demo_banner, header_html, model_panel, model_tab
from .runtime import Runtime
from .sessions import Sessions


def build(runtime: Runtime, can_switch: bool = True) -> gr.Blocks:
    """The page. ``can_switch``: the Model tab may load another model (off when the app listens beyond
    this machine: a switch ends everyone's running requests)."""
    sessions = Sessions(runtime)
    # Model events share one pool of slots, as many as the engine's rows; more wait in Gradio's queue.
    model_event = dict(concurrency_limit=runtime.engine.max_batch, concurrency_id="model")

    with gr.Blocks(title="LFM-MLX", analytics_enabled=False) as page:
        header = gr.HTML(header_html(runtime))
        banner = gr.HTML(demo_banner(runtime), elem_id="demo-banner", visible=runtime.choice.demo)
        with gr.Tabs():
            turns = chat_tab(runtime, sessions, model_event)
            extract_tab(runtime, sessions, model_event)
            panel = model_tab(runtime, can_switch, header, banner)
        for event in turns:
            event.then(lambda: model_panel(runtime), None, panel, queue=False, **PRIVATE)
        add_endpoints(runtime, sessions, model_event)

        def forget(request: gr.Request):
            runtime.submit(sessions.drop, request)  # its arrays are freed on the engine's thread

        page.unload(forget)
    return page
