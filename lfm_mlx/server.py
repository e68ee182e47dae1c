"""An OpenAI-compatible HTTP server over the continuous-batching engine.

``python -m lfm_mlx.server [--model ID_OR_PATH] [--host 127.0.0.1] [--port 8080] [--max-batch N]
[--max-queue N] [--api-key KEY] [--max-kv-size N] [--kv-bits 4|8]``

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events
or not), ``GET /v1/models``, ``GET /health``. The HTTP layer is thin: bodies are validated by the
models in ``lfm_mlx.api``, prompts are built in a worker thread, and the request joins the engine's
batch; its responses come back through one asyncio queue per request. A client that goes away frees
its row before the next step. Every refusal is OpenAI's error object with a 4xx status; a full queue
is a 429 with Retry-After. It binds 127.0.0.1 unless told otherwise and sends no telemetry.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import sys
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .api import APIError, ChatRequest, CompletionRequest, Limits, Prepared, Reply, parse, prepare_chat, \
    prepare_completion
from .engine import Engine

DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_S = 2


class Server:
    """The model behind the routes: its engine, its id, and what one request may ask for."""

    def __init__(self, engine: Engine, model_id: str, *, limits: Limits, api_key: Optional[str] = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 kv_bits: Optional[int] = None, aliases: tuple = ()):
        self.engine, self.model_id, self.limits = engine, model_id, limits
        self.kv_bits = kv_bits
        self.api_key, self.max_queue, self.max_body_bytes = api_key, max_queue, max_body_bytes
        self.names = {model_id, *aliases}
        self.created = int(time.time())

    def switch(self, engine: Engine, model_id: str, *, limits: Limits, kv_bits: Optional[int] = None,
               aliases: tuple = ()) -> None:
        """Serve another model from now on (the app's Model tab loads one); running requests stay on theirs."""
        self.engine, self.model_id, self.limits, self.kv_bits = engine, model_id, limits, kv_bits
        self.names = {model_id, *aliases}
        self.created = int(time.time())

    # --- request bodies ---

    async def body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body_bytes:
                raise self._too_large()
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        _check_unicode(body)
        return body

    def _too_large(self) -> APIError:
        return APIError(f"the request body is over {self.max_body_bytes >> 20} MB", status=413,
                        code="request_too_large")

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.names:
            raise APIError(f"The model {name!r} does not exist here; this server runs {self.model_id!r}.",
                           status=404, param="model", code="model_not_found")

    # --- running one request ---

    def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop):
        """Join the engine's queue, or a 429 when it is full; responses arrive on the returned queue."""
        running, waiting = self.engine.occupancy
        if waiting >= self.max_queue:
            raise APIError(f"The server is busy: {running} requests running and {waiting} waiting. "
                           f"Retry in a few seconds.", status=429, code="rate_limit_exceeded",
                           kind="rate_limit_error")
        responses: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:
            loop.call_soon_threadsafe(responses.put_nowait, item)

        request = replace(prepared.request, max_kv_size=self.limits.context, kv_bits=self.kv_bits)
        try:
            generation = self.engine.submit(request, sink=sink)
        except ValueError as e:
            raise APIError(str(e)) from None
        return generation, responses

    async def complete(self, request: Request, prepared: Prepared) -> Response:
        loop = asyncio.get_running_loop()
        generation, responses = self.submit(prepared, loop)
        reply = Reply(prepared, self.engine.tokenizer, self.model_id)

        async def collect() -> Optional[BaseException]:
            while (item := await responses.get()) is not None:
                if isinstance(item, BaseException):
                    return item
                reply.add(item)
            return None

        result = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():  # the client left: free its row
                generation.cancel()
                result.cancel()
                return Response(status_code=499)
        error = result.result()
        if error is not None:
            raise APIError(f"generation failed: {error}", status=500, kind="server_error")
        return JSONResponse(reply.response())

    async def stream(self, prepared: Prepared, include_usage: bool) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        generation, responses = self.submit(prepared, loop)
        reply = Reply(prepared, self.engine.tokenizer, self.model_id)

        async def events() -> AsyncIterator[str]:
            try:
                if prepared.kind == "chat":
                    yield _sse(reply.chunk({"role": "assistant", "content": ""}))
                while (item := await responses.get()) is not None:
                    if isinstance(item, BaseException):
                        yield _sse(APIError(f"generation failed: {item}", 500, kind="server_error").body())
                        return
                    text = reply.add(item)
                    logprobs = reply.logprobs[-1:] if prepared.logprobs else None
                    if text or logprobs:
                        yield _sse(reply.chunk({"content": text}, logprobs=logprobs))
                rest, calls, reason = reply.finish()
                if rest:
                    yield _sse(reply.chunk({"content": rest}))
                if calls:
                    yield _sse(reply.chunk({"tool_calls": [dict(c, index=i) for i, c in enumerate(calls)]}))
                yield _sse(reply.chunk({}, finish_reason=reason))
                if include_usage:
                    yield _sse(reply.usage_chunk())
                yield "data: [DONE]\n\n"
            finally:  # normal end, or the client went away (the response task is cancelled)
                generation.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def run(self, request: Request, kind: str) -> Response:
        body = await self.body(request)
        if kind == "chat":
            parsed = parse(ChatRequest, body)
            self.check_model(parsed.model)
            prepared = await run_in_threadpool(prepare_chat, parsed, self.engine.model, self.engine.tokenizer,
                                               self.limits)
        else:
            parsed = parse(CompletionRequest, body)
            self.check_model(parsed.model)
            prepared = await run_in_threadpool(prepare_completion, parsed, self.engine.model,
                                               self.engine.tokenizer, self.limits)
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return await self.stream(prepared, include_usage)
        return await self.complete(request, prepared)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "lfm-mlx"}]}


def _check_unicode(value: Any, path: str = "") -> None:
    """JSON can spell lone surrogates ("\\ud800"), which no tokenizer takes: refuse them by name."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(f"{path or 'body'}: the text holds a lone surrogate (invalid Unicode); send "
                           "valid UTF-8 text", param=path or None, code="invalid_value") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, path)
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}.{i}")


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def add_routes(app: FastAPI, server: Server) -> None:
    """The OpenAI routes, /health, OpenAI-style errors, and the API key check, on ``app``."""

    async def authorize(request: Request) -> None:
        """The key, on every /v1 route: a dependency of theirs rather than an HTTP middleware, which
        would wrap every streamed chunk of every route (the app's Gradio routes too) in a task of its own."""
        if server.api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                raise APIError("Incorrect or missing API key: send 'Authorization: Bearer <key>'.", status=401,
                               code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(error.detail), error.status_code, kind=kind).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return JSONResponse(APIError(f"internal error: {type(error).__name__}", 500, kind="server_error").body(),
                            status_code=500)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await server.run(request, "chat")

    @v1.post("/completions")
    async def completions(request: Request):
        return await server.run(request, "completion")

    @v1.get("/models")
    async def models():
        return server.models()

    @v1.get("/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return server.models()["data"][0]

    app.include_router(v1)

    @app.get("/health")
    async def health():
        running, waiting = server.engine.occupancy
        return {"status": "ok", "model": server.model_id, "running": running, "waiting": waiting}


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="lfm-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    add_routes(app, server)
    return app


def context_limit(model, max_kv_size: Optional[int]) -> int:
    """Prompt and reply must fit the trained context and the KV window (a request never rolls it)."""
    trained = model.args.max_position_embeddings
    return min(trained, max_kv_size) if max_kv_size else trained


def parse_args(argv=None) -> argparse.Namespace:
    from .resolve import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m lfm_mlx.server",
                                description="An OpenAI-compatible server for LFM2 on MLX, with continuous batching.")
    p.add_argument("--model", help=f"hub id or local directory (default {DEFAULT_MODEL}, converted once to 4-bit)")
    p.add_argument("--demo", action="store_true", help="serve the small random-weight demo model (no download)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests waiting beyond the batch before new ones get 429 (default 64)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route")
    p.add_argument("--max-kv-size", type=int, default=32768, help="context window per request, in tokens")
    p.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize KV caches to save memory")
    p.add_argument("--max-tokens", type=int, default=4096, help="ceiling on one reply's tokens (default 4096)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024,
                   help="memory for reusable prompt states across requests (default 1024; 0: off)")
    p.add_argument("--interleave-tokens", type=int, default=64,
                   help="prompt tokens read per step beside running streams: lower keeps streams smoother")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_kv_size", "max_tokens", "interleave_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.prefix_cache_mb < 0:
        p.error("--prefix-cache-mb must be 0 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from .resolve import resolve_model
    from .loading import load
    from .process import settle_for_serving
    from .sample import read_generation_config

    try:
        choice = resolve_model(args.model, demo=args.demo, log=lambda m: print(m, file=sys.stderr))
        model, tokenizer = load(choice.path)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = Engine(model, tokenizer, max_batch=args.max_batch, interleave_tokens=args.interleave_tokens,
                    prefix_cache_bytes=args.prefix_cache_mb << 20)
    limits = Limits(context=context_limit(model, args.max_kv_size), max_tokens=args.max_tokens,
                    defaults=read_generation_config(choice.path))
    server = Server(engine, choice.name, limits=limits, api_key=args.api_key, max_queue=args.max_queue,
                    kv_bits=args.kv_bits, aliases=(str(choice.path),))
    engine.start()
    settle_for_serving()
    print(f"Serving {choice.name}{' (DEMO: random weights)' if choice.demo else ''} at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
