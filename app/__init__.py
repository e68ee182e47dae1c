"""The local web app (``python -m app``): chat and structured extraction over one shared model.

``Runtime`` owns the model, its tokenizer and the one thread that ever calls them. Every request, from
any browser tab or API client, runs there in turn, so model calls never overlap and MLX is only used
from the thread that loaded the model (Metal streams belong to a thread). ``Runtime.stream`` hands a
generation's tokens back in batches at most every 40 ms: per-token updates make Gradio's browser side
fall seconds behind a fast model. ``Sessions`` keeps one ``ChatState`` per browser tab or API client:
conversations are never shared, only the model is. ``app/ui.py`` builds the page and its handlers on top.
"""

from __future__ import annotations

import queue
import resource
import sys
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, Optional

import mlx.core as mx

from lfm_mlx.chat import ChatSession

UPDATE_INTERVAL_S = 0.04  # about 25 UI updates per second
HEARTBEAT_S = 0.25  # an empty batch this often while nothing arrives, so a cancel is never stuck waiting


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Runtime:
    """The model, the tokenizer, how they were chosen, and the thread they run on."""

    def __init__(self, choice, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None, dtype=None):
        import lfm_mlx

        self.choice, self.max_kv_size, self.kv_bits = choice, max_kv_size, kv_bits
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="lfm-mlx-model", daemon=True).start()
        self.model, self.tokenizer = self.call(lfm_mlx.load, choice.path, dtype)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # a failed job must not take the model thread down with it
                traceback.print_exc()

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` on the model thread, after the jobs queued before it."""
        future: Future = Future()

        def job():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

        self._jobs.put(job)
        return future.result()

    def submit(self, fn: Callable, *args) -> None:
        """``fn(*args)`` on the model thread, without waiting (e.g. to free MLX arrays where they live)."""
        self._jobs.put(lambda: fn(*args))

    def stream(self, start: Callable[[], Iterable], stop: threading.Event, idle: threading.Event,
               interval: float = UPDATE_INTERVAL_S) -> Iterator[list]:
        """Run ``start()`` and iterate what it returns on the model thread; yield its items in batches:
        the first at once, then at most one batch per ``interval``, and ``[]`` as a heartbeat while
        nothing arrives. Closing this generator, or setting ``stop``, closes the model's iterator after
        its current item; ``idle`` is set once it is closed."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        done = object()
        idle.clear()

        def job():
            try:
                if stop.is_set():
                    return
                iterator = iter(start())
                try:
                    for item in iterator:
                        items.put(item)
                        if stop.is_set():
                            break
                finally:
                    getattr(iterator, "close", lambda: None)()
            except BaseException as e:
                items.put(_Failure(e))
            finally:
                idle.set()
                items.put(done)

        self._jobs.put(job)
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
        """What the model panel shows: name, path, quantization, weights size, backend, memory."""
        from mlx.utils import tree_flatten

        args = self.model.args
        weights = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        q = args.quantization or {}
        dtype = str(self.model.model.embedding_norm.weight.dtype).removeprefix("mlx.core.")
        quant = f"{q['bits']}-bit {q.get('mode', 'affine')}, group size {q.get('group_size', 64)}" if q.get("bits") else f"none ({dtype})"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return dict(
            name=self.choice.name, directory=str(self.choice.path), demo=self.choice.demo, note=self.choice.note,
            quantization=quant, weights_mb=weights / 1e6, backend=backend(),
            layers=f"{len(args.layer_types)} ({len(args.attention_layers)} attention)",
            max_kv_size=self.max_kv_size, kv_bits=self.kv_bits,
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


# --- per-session chat state -------------------------------------------------------------------------

class ChatState:
    """One session's conversation, the stats under each reply, and its running generation."""

    def __init__(self, runtime: Runtime):
        self.session = ChatSession(runtime.model, runtime.tokenizer, max_kv_size=runtime.max_kv_size,
                                   kv_bits=runtime.kv_bits)
        self.stats: dict[int, dict] = {}  # index of an assistant message → its stats
        self.stop, self.idle = threading.Event(), threading.Event()
        self.idle.set()
        self.display: list[int] = []  # chatbot row → index in session.messages


class Sessions:
    """Chat states by session hash; the least recently used are dropped beyond ``limit``."""

    def __init__(self, runtime: Runtime, limit: int = 128):
        self.runtime, self.limit = runtime, limit
        self._states: OrderedDict[str, ChatState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, request) -> ChatState:
        """The state of the Gradio session behind ``request`` (a gr.Request), made on first use."""
        key = getattr(request, "session_hash", None) or "default"
        with self._lock:
            if key not in self._states:
                self._states[key] = ChatState(self.runtime)
                while len(self._states) > self.limit:
                    self._states.popitem(last=False)
            self._states.move_to_end(key)
            return self._states[key]

    def drop(self, request) -> None:
        with self._lock:
            self._states.pop(getattr(request, "session_hash", None), None)


def response_stats(r) -> dict:
    return dict(ttft_s=r.ttft_s, tokens=r.generation_tokens, tps=r.generation_tps, peak_mb=r.peak_memory_mb,
                cached=r.cached_tokens, prompt=r.prompt_tokens, finish=r.finish_reason or "stopped", at=time.time())


def run_turn(runtime: Runtime, state: ChatState, start) -> Iterator[tuple[str, Any]]:
    """Stream one reply: ``start(session)`` returns the engine's iterator. Yields (reply so far, last
    response or None), merged to ~25 updates a second; records the reply's stats as they come."""
    state.idle.wait(10)  # a stopped reply may still be closing on the model thread
    state.stop = threading.Event()
    where: list[int] = []

    def begin():
        iterator = start(state.session)
        where.append(len(state.session.messages))  # the index the reply will take
        return iterator

    reply, last = "", None
    for batch in runtime.stream(begin, state.stop, state.idle):
        for r in batch:
            reply, last = reply + r.text, r
        if last is not None:
            state.stats[where[0]] = response_stats(last)
        yield reply, last
