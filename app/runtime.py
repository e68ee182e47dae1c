"""The model behind the app: ``Runtime`` owns the model, its tokenizer and the continuous-batching
engine that runs them on a thread of its own. Every chat turn and extraction, from any browser tab or API
client, is a row in the engine's batch, so two tabs stream at the same time and one long request never
holds the model for the others. ``Runtime.stream`` runs one request on a pump thread and hands what it
produces back in batches at most every 40 ms (per-token updates make Gradio's browser side fall seconds
behind a fast model), with an empty batch as a heartbeat while nothing arrives: Gradio notices a client
that went away only when a handler yields, and closing the stream cancels the request, freeing its rows
within an engine step."""

from __future__ import annotations

import queue
import resource
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx

from lfm_mlx.chat import ChatSession
from lfm_mlx.engine import Engine
from lfm_mlx.sample import read_generation_config

UPDATE_INTERVAL_S = 0.04  # about 25 UI updates per second
HEARTBEAT_S = 0.25  # an empty batch this often while nothing arrives, so a cancel is never stuck waiting
MAX_BATCH = 16  # conversations and extractions decoded together; more wait in Gradio's queue
PREFIX_CACHE_BYTES = 256 << 20  # extraction prompts (system prompt + schema) are prefilled once
MAX_REPLY_TOKENS = 4096  # a ceiling on one reply, whatever a client asks for, in the UI, its API and /v1


class Busy(RuntimeError):
    """The session's previous turn is still running."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Runtime:
    """The model, the tokenizer, how they were chosen, and the engine that runs them. ``switch`` puts
    another model in their place; ``on_switch`` callbacks (the sessions, the /v1 server) follow it."""

    def __init__(self, choice, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None, dtype=None,
                 max_batch: int = MAX_BATCH):
        self.dtype, self.max_batch = dtype, max_batch
        self.on_switch: list[Callable[["Runtime"], None]] = []
        self._switching = threading.Lock()
        self._start(choice, max_kv_size, kv_bits)

    def _start(self, choice, max_kv_size: Optional[int], kv_bits: Optional[int]) -> None:
        import lfm_mlx

        engine = Engine.start_loaded(lambda: lfm_mlx.load(choice.path, self.dtype), max_batch=self.max_batch,
                                     prefix_cache_bytes=PREFIX_CACHE_BYTES)
        old = getattr(self, "engine", None)
        self.choice, self.max_kv_size, self.kv_bits = choice, max_kv_size, kv_bits
        self.sampling_defaults = read_generation_config(choice.path)
        self.engine, self.model, self.tokenizer = engine, engine.model, engine.tokenizer
        for callback in self.on_switch:
            callback(self)
        if old is not None:
            old.stop()  # what still runs on the old model ends with an error

    def switch(self, choice, max_kv_size: Optional[int], kv_bits: Optional[int]) -> None:
        """Load ``choice`` while the current model keeps serving, then swap them: requests still running
        on the old model end with an error, and every conversation starts over on the new one."""
        if not self._switching.acquire(blocking=False):
            raise Busy("another model is loading: wait for it to finish")
        try:
            self._start(choice, max_kv_size, kv_bits)
        finally:
            self._switching.release()

    @property
    def context(self) -> int:
        """Tokens a conversation sees at once: the KV window, within the context the model was trained on."""
        trained = self.model.args.max_position_embeddings
        return min(self.max_kv_size, trained) if self.max_kv_size else trained

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0

    def new_session(self, **options) -> ChatSession:
        """A conversation whose replies run as rows of the shared engine."""
        return ChatSession(self.model, self.tokenizer, max_kv_size=self.max_kv_size, kv_bits=self.kv_bits,
                           engine=self.engine, defaults=self.sampling_defaults, **options)

    def submit(self, fn: Callable, *args) -> None:
        """``fn(*args)`` on the engine's thread, without waiting (e.g. to free MLX arrays where they live)."""
        self.engine.call(fn, *args, wait=False)

    def stream(self, produce: Callable[[Callable[[Any], None]], None], stop: threading.Event,
               idle: Optional[threading.Event] = None, interval: float = UPDATE_INTERVAL_S) -> Iterator[list]:
        """Run ``produce(emit)`` on a pump thread; yield what it emits in batches: the first item at once,
        then at most one batch per ``interval``, and ``[]`` as a heartbeat while nothing arrives. Its
        exception is raised here. Closing this generator sets ``stop``: ``produce`` passes it to the
        library as ``cancel``, so the engine frees its rows within a step. ``idle`` is set once the pump
        has finished (a stopped chat turn still writes its partial reply to the session)."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        done = object()

        def pump():
            try:
                if not stop.is_set():
                    produce(items.put)
            except BaseException as e:  # raised to the consumer, if it is still there
                items.put(_Failure(e))
            finally:
                if idle is not None:
                    idle.set()
                items.put(done)

        threading.Thread(target=pump, name="lfm-mlx-request", daemon=True).start()
        batch: list = []
        last = -float("inf")
        try:
            while True:
                now = time.monotonic()
                if batch and now - last >= interval:
                    yield batch
                    batch, last = [], now
                try:
                    item = items.get(timeout=max(interval - (now - last), 1e-3) if batch else HEARTBEAT_S)
                except queue.Empty:
                    if not batch:
                        yield []
                    continue
                if item is done:
                    break
                if isinstance(item, _Failure):
                    raise item.error
                batch.append(item)
            if batch:
                yield batch
        finally:
            stop.set()

    def info(self) -> dict:
        """What the model panel shows: name, path, quantization, weights size, backend, memory, load."""
        from mlx.utils import tree_flatten

        args = self.model.args
        weights = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        q = args.quantization or {}
        dtype = str(self.model.model.embedding_norm.weight.dtype).removeprefix("mlx.core.")
        quant = f"{q['bits']}-bit {q.get('mode', 'affine')}, group size {q.get('group_size', 64)}" if q.get("bits") else f"none ({dtype})"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        running, waiting = self.engine.occupancy
        return dict(
            name=self.choice.name, directory=str(self.choice.path), demo=self.choice.demo, note=self.choice.note,
            quantization=quant, weights_mb=weights / 1e6, backend=backend(),
            layers=f"{len(args.layer_types)} ({len(args.attention_layers)} attention)",
            max_kv_size=self.max_kv_size, kv_bits=self.kv_bits, max_batch=self.engine.max_batch,
            running=running, waiting=waiting,
            active_mb=mx.get_active_memory() / 1e6, peak_mb=mx.get_peak_memory() / 1e6,
            process_peak_mb=rss / (1e6 if sys.platform == "darwin" else 1e3),
        )


def backend() -> str:
    if mx.metal.is_available():
        return "Metal (Apple GPU)"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "CUDA"
    return "CPU"
