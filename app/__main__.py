"""``python -m app``: pick the model (converting it once if needed), load it, and serve the web UI and,
on the same port, the OpenAI-compatible API under ``/v1`` (as LM Studio does: UI and API in one process)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

STYLE = Path(__file__).with_name("style.css")
MAX_SESSIONS = 100  # browser tabs and API clients whose state the app keeps; the oldest go first


def parse_args(argv=None) -> argparse.Namespace:
    from lfm_mlx.resolve import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m app", description="Chat and structured extraction with LFM2 on MLX.")
    p.add_argument("--model", help=f"hub id or local directory (default {DEFAULT_MODEL}, converted once to "
                                   "MLX 4-bit and cached in ~/.cache/lfm_mlx)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-kv-size", type=int, default=32768,
                   help="attention window in tokens; longer chats roll, keeping the start and the most recent "
                        "(0: unbounded)")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the KV cache to save memory")
    p.add_argument("--demo", action="store_true", help="run the small random-weight demo model (no download)")
    args = p.parse_args(argv)
    if args.max_kv_size < 0 or 0 < args.max_kv_size <= 64:
        p.error("--max-kv-size must be 0 (unbounded) or more than 64 tokens")
    return args


def theme(gr):
    """Soft, with the system's fonts: a local app should not fetch fonts from the internet."""
    return gr.themes.Soft(primary_hue="indigo", neutral_hue="slate",
                          font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    from lfm_mlx.resolve import resolve_model

    from .runtime import MAX_REPLY_TOKENS, Runtime

    try:
        choice = resolve_model(args.model, demo=args.demo)
        runtime = Runtime(choice, max_kv_size=args.max_kv_size, kv_bits=args.kv_bits)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Loaded {choice.name} from {choice.path} in {time.perf_counter() - start:.1f} s"
          + (" — DEMO MODEL, random weights" if choice.demo else ""), flush=True)

    import gradio as gr
    import uvicorn

    from lfm_mlx.api import Limits
    from lfm_mlx.process import settle_for_serving
    from lfm_mlx.server import Server, create_app

    from .ui import build

    page = build(runtime, can_switch=args.host in ("127.0.0.1", "localhost", "::1"))
    # Gradio keeps each session's state, and the inputs of its calls, in memory: every API client is a
    # session, so without a bound a stream of clients (say, 1 MB documents) grows the process forever.
    page.state_session_capacity = MAX_SESSIONS
    page.queue(default_concurrency_limit=None)  # model events share their own pool of slots (see ui.build)
    def served(rt: Runtime) -> dict:  # the same limits as the UI's
        return dict(limits=Limits(context=rt.context, max_tokens=MAX_REPLY_TOKENS, defaults=rt.sampling_defaults),
                    kv_bits=rt.kv_bits,
                    aliases=(str(rt.choice.path),))

    server = Server(runtime.engine, choice.name, **served(runtime))
    runtime.on_switch.append(lambda rt: server.switch(rt.engine, rt.choice.name, **served(rt)))
    api = create_app(server)
    app = gr.mount_gradio_app(api, page, path="/", server_name=args.host, server_port=args.port, show_error=True,
                              max_file_size="20mb", theme=theme(gr), css_paths=[STYLE], footer_links=["api"])
    if not port_free(args.host, args.port):
        print(f"error: cannot listen on {args.host}:{args.port}: the port is in use", file=sys.stderr)
        return 2
    print(f"Chat and extraction: http://{args.host}:{args.port}/ · OpenAI-compatible API: "
          f"http://{args.host}:{args.port}/v1", flush=True)
    settle_for_serving()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def port_free(host: str, port: int) -> bool:
    """uvicorn exits the process itself when it cannot bind: ask first, to say so in one line."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
