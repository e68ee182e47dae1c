"""Per-session state: ``Sessions`` keeps one ``ChatState`` per browser tab or API client (conversations
are never shared, only the model is), and ``run_turn`` streams one reply of a session."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

from lfm_mlx.chat import ChatSession

from .runtime import Busy, Runtime

class ChatState:
    """One session's conversation, the stats under each reply, its running turn, and the cancel events
    of its running extractions (by tab), which the Stop buttons set."""

    def __init__(self, runtime: Runtime):
        self.session = runtime.new_session()
        self.stats: dict[int, dict] = {}  # index of an assistant message → its stats
        self.stop, self.idle = threading.Event(), threading.Event()
        self.idle.set()
        self.turn_lock = threading.Lock()
        self.display: list[int] = []  # chatbot row → index in session.messages
        self.extractions: dict[str, threading.Event] = {}

    def forget_stats_from(self, index: int) -> None:
        """Messages from ``index`` on were replaced or removed: their stats go with them."""
        for i in [i for i in self.stats if i >= index]:
            del self.stats[i]


class Sessions:
    """Chat states by session hash; the least recently used are dropped beyond ``limit``."""

    def __init__(self, runtime: Runtime, limit: int = 128):
        self.runtime, self.limit = runtime, limit
        self._states: OrderedDict[str, ChatState] = OrderedDict()
        self._lock = threading.Lock()
        runtime.on_switch.append(lambda _: self.clear())

    def clear(self) -> None:
        """Forget every session: their caches belong to a model that is gone."""
        with self._lock:
            self._states.clear()

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


def run_turn(runtime: Runtime, state: ChatState, start: Callable[[ChatSession, threading.Event], Iterable]
             ) -> Iterator[tuple[str, Any]]:
    """Stream one reply: ``start(session, cancel)`` returns the session's iterator, its request
    cancelled by ``cancel``. Yields (reply so far, last response or None), merged to ~25 updates a
    second; records the reply's stats as they come. Raises ``Busy`` if the session's previous turn
    is still closing after a few seconds."""
    with state.turn_lock:
        if not state.idle.wait(10):  # a stopped reply may still be closing
            raise Busy("this conversation is still answering: wait for the reply or stop it")
        state.stop = stop = threading.Event()  # before ``idle`` clears: a Stop that sees a turn sets its event
        state.idle.clear()
    where: list[int] = []

    def produce(emit: Callable) -> None:
        responses = start(state.session, stop)
        where.append(len(state.session.messages))  # the index the reply will take
        state.forget_stats_from(where[0])
        for response in responses:  # ends within a step of ``stop``: it is the request's cancel
            emit(response)

    reply, last = "", None
    for batch in runtime.stream(produce, stop, state.idle):
        for r in batch:
            reply, last = reply + r.text, r
        if last is not None:
            state.stats[where[0]] = response_stats(last)
        yield reply, last
