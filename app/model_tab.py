"""The Model tab: what is loaded (quantization, memory, engine load), and loading another model (a local
directory, a hub id, or the demo) with its KV settings while the current one keeps serving."""

from __future__ import annotations

import html
import queue
import threading
from typing import Any, Iterator, Optional

import gradio as gr

from .inputs import PRIVATE, as_sentence, refuse, soft, text_field, whole
from .runtime import Busy, Runtime

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
        raise refuse(f"Could not load {name}: {'' if known else type(error).__name__ + ': '}{as_sentence(error)}")


def demo_banner(runtime: Runtime) -> str:
    why = f" ({runtime.choice.note})" if runtime.choice.note else ""
    return (f'<div class="demo-banner">⚠️ <b>Demo model: its weights are random</b>{why}. Replies are '
            "word salad and extractions are placeholders: this shows the app working, not LFM2. Connect to "
            "the internet once, or pass <code>--model PATH_OR_HUB_ID</code>, to run LiquidAI/LFM2.5-350M.</div>")


def model_tab(runtime: Runtime, can_switch: bool, header: gr.HTML, banner: gr.HTML) -> gr.Markdown:
    """Build the tab (inside the page's ``gr.Tabs``); a load updates the page's ``header`` and ``banner``.
    Returns the model panel, which the page refreshes after each chat turn."""
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
    refresh.click(lambda: model_panel(runtime), None, panel, queue=False, **PRIVATE)

    def load_model(name: Any, window: Any, bits: Any) -> Iterator[tuple]:
        """Find (download, convert) and load the model while the current one serves, then swap."""
        unchanged = (gr.skip(),) * 3
        if not can_switch:
            raise refuse("Loading another model from the page is off while the app listens beyond this machine.")
        name = text_field(name, "The model").strip()
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
    return panel
