"""The continuous-batching engine: many sequences share every forward pass.

The shape is vLLM's scheduler: one loop, one token budget per step. Running sequences feed their last
sampled token first; prompts still being read fill what is left of the budget in chunks, shortest
first, so a long prompt never stalls the streams already running. Sequences join between steps and
leave on EOS, a stop string, max_tokens or cancel.

Every sequence keeps its own hybrid cache (conv state + a KV window of its own size and precision).
A step lays the rows' new tokens end to end: the matmuls see one flat batch, and attention and the
convolutions read each row's own cache (``cache.Rows``). Nothing is padded, so nothing can leak from
one row into another, and a row's tokens are computed as they would be alone.

Each row samples with its own settings, seed, stop strings and logits processors (e.g. a JSON-schema
constraint). The next step is queued before the previous step's tokens are read back, so the device
computes while Python detokenizes.

Text a constraint forces after a sampled token (a key, `": "`, closing brackets: its ``fast_forward``)
is fed with that token in the same pass, not one step each. With ``draft_tokens`` (4 unless set),
greedy constrained rows also guess ahead by prompt lookup: the text that followed the latest
occurrence, in the prompt, of the last characters written (a value being copied from the document),
tokenized. Drafts the grammar allows are fed in the same pass, verified against the masked greedy
choice at each position, and the caches step back over the rejected ones, so the output stays the
token-by-token one. Looking text up rather than token ids finds values whose tokens differ inside
JSON (`"Ada` is not ` Ada`).

The engine runs where it is driven: iterating a ``Generation`` steps it when no thread does (a
notebook), or ``start()`` gives it a thread of its own (the server, the app), which is then the only
thread that touches MLX.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import mlx.core as mx

from .cache import PrefixCache, PromptCache, batch_rows, cache_arrays, split_rows
from .sample import SamplingSettings, build_processors, new_key, repeat_penalty, sample, split_keys

DEFAULT_MAX_BATCH = 32
DEFAULT_PREFILL_STEP = 512  # prompt tokens per step while nothing else runs
DEFAULT_INTERLEAVE = 64  # prompt tokens per step beside running streams: their latency bound
DEFAULT_DRAFT_TOKENS = 4  # prompt-lookup drafts per pass for greedy constrained rows (extraction)


class Cancelled(RuntimeError):
    """Raised by callers that collect whole results (extraction) when their cancel event was set."""


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response (never a split UTF-8 character)
    token: int
    finish_reason: Optional[str]  # None while running, then "stop" or "length"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from a reused cache, as in OpenAI's usage
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft_s: float
    peak_memory_mb: float
    logprob: Optional[float] = None  # of this token under the model, when the request asked
    top_logprobs: Optional[list] = None  # [(token, logprob)], most likely first
    in_tool_call: bool = False  # set by the chat layer: this text lies inside a tool-call span
    tool_calls: Optional[list] = None  # set by the chat layer on the last response


@dataclass
class Request:
    """One sequence to generate. ``prompt`` is token ids; ``prompt_cache`` (a conversation's state) is
    reused and left holding the conversation; otherwise the engine's prefix cache may supply a prefix.
    ``checkpoints``: prompt positions to snapshot (message boundaries), so later prompts that depart
    from this one there can reuse it. ``logprobs``: how many alternatives to report per token (0: just
    the chosen token's log-probability)."""

    prompt: Sequence[int]
    max_tokens: int = 256
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    logits_processors: Sequence[Callable] = ()
    logprobs: Optional[int] = None
    prompt_cache: Optional[PromptCache] = None
    checkpoints: Sequence[int] = ()
    max_kv_size: Optional[int] = None
    kv_bits: Optional[int] = None
    keep: int = 4
    cancel: Optional[threading.Event] = None  # set from anywhere: the row leaves before the next step


class Generation:
    """A submitted request. Iterate it for its ``GenerationResponse``s; ``cancel()``, from any thread,
    frees its row before the next step. Closing the iterator early cancels too. A sink, if given,
    receives each response, then None at the end or the exception that ended the request."""

    def __init__(self, engine: "Engine", request: Request, sink: Optional[Callable] = None):
        self.engine, self.request = engine, request
        self.submitted_at = time.perf_counter()
        self._cancelled = False
        self.finished = False
        self._sink = sink or self._queue_put
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def cancelled(self) -> bool:
        return self._cancelled or (self.request.cancel is not None and self.request.cancel.is_set())

    def cancel(self) -> None:
        self._cancelled = True
        self.engine._wakeup.set()

    def _queue_put(self, item) -> None:
        self._queue.put(item)

    def _emit(self, item) -> None:
        """From the engine: a response, an exception, or None at the end."""
        if item is None or isinstance(item, BaseException):
            self.finished = True
        try:
            self._sink(item)
        except Exception:  # the consumer is gone (say, its event loop closed): nobody to tell
            self._cancelled = True

    def __iter__(self) -> Iterator[GenerationResponse]:
        try:
            while True:
                item = self._next()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self.finished:
                self.cancel()
                if not self.engine.threaded:  # nobody else steps this engine: free the row now
                    self.engine._drop_cancelled()

    def _next(self):
        if self.engine.threaded:
            while True:
                try:
                    return self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue
        while self._queue.empty():
            if not self.engine.step() and self._queue.empty():
                raise RuntimeError("the engine has nothing to do, yet this generation has not finished")
        return self._queue.get_nowait()


def continuation(source: str, written: str, chars: int = 48) -> str:
    """What followed, in ``source``, the latest occurrence of the longest end of ``written`` found
    (of 3 to 24 characters): the likely next text when a model copies from its prompt. (Looking in
    ``written`` too finds more drafts but worse ones: fewer passes saved on the presets.)"""
    for n in (24, 16, 12, 8, 6, 4, 3):
        at = source.rfind(written[-n:]) if len(written) >= n else -1
        if at >= 0:
            return source[at + n : at + n + chars]
    return ""


class _Row:
    """A running sequence: its cache, where its prompt is, and its sampling state."""

    def __init__(self, engine: "Engine", gen: Generation, cache: PromptCache):
        request = gen.request
        self.gen, self.request = gen, request
        self.prompt = list(request.prompt)
        self.adopt(cache)
        self.prefixes_seen = engine.prefix_cache.inserts if engine.prefix_cache else 0
        self.processors = build_processors(request.sampling, request.logits_processors)
        penalty, context = request.sampling.repetition_penalty, request.sampling.repetition_context_size
        self.repetition = penalty if penalty != 1.0 else None  # applied to all rows of a step at once
        self.recent = deque(self.prompt[-context:], maxlen=context) if self.repetition else None
        # A constraint that can name the tokens it forces; not when every token's logprob is asked for.
        self.constraint = None if request.logprobs is not None or not engine.fast_forward else next(
            (p for p in request.logits_processors if hasattr(p, "fast_forward")), None)
        self.forced: list[int] = []  # tokens forced after ``pending``, fed with it this step
        speculate = engine.draft_tokens and self.constraint is not None and request.sampling.greedy
        # Prompt lookup drafts from the prompt's text (special tokens left out: a draft never ends the reply).
        self.source = engine.tokenizer.decode(self.prompt, skip_special_tokens=True) if speculate else None
        self.written = ""  # the text so far, when drafting
        self.drafts: list[int] = []  # fed after ``forced`` this step, to verify
        self.step_tokens = 0  # tokens fed this step: pending, forced, drafts
        self.drafted = self.accepted = 0
        self.history = mx.array(self.prompt) if self.processors else None
        self.key = None if request.sampling.greedy else new_key(request.seed)[None]  # [1, 2]: rows' keys stack
        self.pending: Optional[mx.array] = None  # the token sampled last step, not yet read back
        self.pending_logprobs: Optional[tuple] = None
        self.final = False  # the pending token is the last one: read it, never feed it
        self.text = ReplyText(engine.tokenizer, request.stop, engine.eos, request.max_tokens)
        self.admitted_at = time.perf_counter()
        self.first_token_at: Optional[float] = None

    def adopt(self, cache: PromptCache) -> None:
        """Start from ``cache``, at its longest prefix of the prompt that can be reused."""
        self.cache = cache
        self.cached = cache.reuse(self.prompt)
        self.fed = self.cached  # prompt tokens the cache holds
        # Always just before the last prompt token too: what a regenerated reply starts from.
        self.checkpoints = sorted({p for p in (*self.request.checkpoints, len(self.prompt) - 1)
                                   if self.cached < p <= len(self.prompt)})

    @property
    def prompt_left(self) -> int:
        return len(self.prompt) - self.fed

    def chunk_limit(self) -> int:
        """Tokens this row may feed at once: its KV window beside the sinks."""
        windows = [c.max_size - c.keep for c in self.cache.layers if getattr(c, "max_size", None)]
        return min(windows, default=1 << 30)


class ReplyText:
    """Token ids → streamed text: never a split UTF-8 character, stop strings never shown even in
    part, and the finish reason ("stop" for EOS or a stop string, "length" at ``max_tokens``)."""

    def __init__(self, tokenizer, stop: Sequence[str], eos: set, max_tokens: int):
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.stops = StopMatcher(stop)
        self.eos, self.max_tokens = eos, max_tokens
        self.count = 0  # tokens seen, EOS included

    def add(self, token: int) -> tuple[str, Optional[str]]:
        """(text to show now, finish reason or None)."""
        self.count += 1
        finish = None
        if token in self.eos:
            finish, segment = "stop", ""
        else:
            self.detokenizer.add_token(token)
            segment = self.detokenizer.last_segment
        if finish or self.count == self.max_tokens:
            self.detokenizer.finalize()
            segment += self.detokenizer.last_segment
        text, hit = self.stops.feed(segment)
        if hit:
            finish = "stop"
        finish = finish or ("length" if self.count == self.max_tokens else None)
        if finish and not hit:
            text += self.stops.flush()
        return text, finish


class StopMatcher:
    """Stop strings matched across token boundaries: text that could still begin a stop string is
    held back, so a stop string is never shown, even in part."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to show, whether a stop string was hit)."""
        if not self.stop:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """Continuous batching over one model. ``max_batch`` rows run at once (the rest wait in order);
    a step feeds at most ``prefill_step_size`` prompt tokens when no row is decoding, and
    ``interleave_tokens`` beside decoding rows. ``prefix_cache_bytes`` > 0 keeps finished requests'
    states, and running ones' at message boundaries, for reuse by later requests sharing their prefix."""

    def __init__(self, model, tokenizer, *, max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP, interleave_tokens: int = DEFAULT_INTERLEAVE,
                 prefix_cache_bytes: int = 0, fast_forward: bool = True, draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        if max_batch < 1 or prefill_step_size < 1 or interleave_tokens < 1:
            raise ValueError("max_batch, prefill_step_size and interleave_tokens must be positive")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.fast_forward = fast_forward
        self.draft_tokens = draft_tokens
        self.prefill_step_size, self.interleave_tokens = prefill_step_size, interleave_tokens
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.eos = set(tokenizer.eos_token_ids)
        self.vocab_size = model.args.vocab_size
        self.waiting: deque[Generation] = deque()
        self.running: list[_Row] = []
        self.steps = 0
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._closed = False  # the loop has ended: nothing submitted from now on would run
        self._submit_lock = threading.Lock()
        self._sampled: tuple[list, Optional[mx.array]] = ([], None)  # last step's rows and tokens

    # --- the outside: any thread ------------------------------------------------------------------

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def submit(self, request: Request, sink: Optional[Callable] = None) -> Generation:
        """Queue ``request``; ``sink(item)`` (called on the engine's thread) receives each response,
        then None or an exception; without a sink, iterate the returned ``Generation``."""
        self.check(request)
        gen = Generation(self, request, sink)
        with self._submit_lock:
            if self._closed:
                raise RuntimeError("the engine has stopped: it takes no more requests")
            self._incoming.put(gen)
        self._wakeup.set()
        return gen

    def check(self, request: Request) -> None:
        """Everything about ``request`` that can be wrong, as a ValueError before it is queued."""
        prompt = request.prompt
        if not len(prompt):
            raise ValueError("the prompt is empty: give at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if isinstance(request.max_tokens, bool) or not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, not {request.max_tokens!r}")
        if not isinstance(request.sampling, SamplingSettings):
            raise ValueError("sampling must be a SamplingSettings")
        request.sampling.check_vocabulary(self.vocab_size)
        if request.logprobs is not None and not 0 <= request.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, not {request.logprobs}")
        if request.kv_bits not in (None, 4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, not {request.kv_bits}")

    def stream_many(self, requests: Iterable[Request], window: Optional[int] = None) -> Iterator[tuple[int, object]]:
        """Run many requests, at most ``window`` (default: ``max_batch``) queued at once, taken from
        ``requests`` only as earlier ones end (so a million prompts never wait in memory). Yields
        ``(i, item)`` as items arrive for request i: responses, then None when it ends, or the
        exception that ended it. Closing the iterator cancels what is still running."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        source = enumerate(requests)
        live: dict[int, Generation] = {}
        window = window or self.max_batch

        def top_up() -> None:
            while len(live) < window:
                i, request = next(source, (None, None))
                if request is None:
                    return
                try:
                    live[i] = self.submit(request, sink=lambda item, i=i: events.put((i, item)))
                except ValueError as e:  # this request alone is refused
                    events.put((i, e))

        try:
            top_up()
            while live or not events.empty():
                if self.threaded:
                    i, item = events.get()
                else:
                    while events.empty():
                        if not self.step() and events.empty():
                            raise RuntimeError("the engine has nothing to do, yet requests have not finished")
                    i, item = events.get_nowait()
                if item is None or isinstance(item, BaseException):
                    live.pop(i, None)
                    top_up()
                yield i, item
        finally:
            for generation in live.values():
                generation.cancel()
            if live and not self.threaded:
                self._drop_cancelled()

    @property
    def occupancy(self) -> tuple[int, int]:
        """(rows running, requests waiting), as last seen by the engine plus what is queued since."""
        return len(self.running), len(self.waiting) + self._incoming.qsize()

    def call(self, fn: Callable, *args, wait: bool = True, **kwargs):
        """``fn(*args, **kwargs)`` on the engine's thread, between steps; its result or exception.
        ``wait=False`` queues it and returns at once (e.g. to free MLX arrays where they live)."""
        if not self.threaded or threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        if not wait:
            self._jobs.put(lambda: fn(*args, **kwargs))
            self._wakeup.set()
            return None
        done = threading.Event()
        box: dict = {}

        def job():
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as e:  # handed to the caller
                box["error"] = e
            done.set()

        self._jobs.put(job)
        self._wakeup.set()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def start(self) -> "Engine":
        """Run steps on a daemon thread of the engine's own from now on."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lfm-mlx-engine", daemon=True)
            self._thread.start()
            # MLX aborts the process if it exits while this thread is still alive inside it.
            atexit.register(self.stop)
        return self

    @classmethod
    def start_loaded(cls, load: Callable[[], tuple], **options) -> "Engine":
        """Load (model, tokenizer) on a new thread and make it the engine's thread: MLX then only
        ever runs on one thread (on Metal, streams belong to the thread that made them)."""
        ready: queue.SimpleQueue = queue.SimpleQueue()

        def run() -> None:
            try:
                engine = cls(*load(), **options)
                engine._thread = threading.current_thread()
            except BaseException as e:  # handed to the caller
                ready.put(e)
                return
            ready.put(engine)
            engine._loop()

        threading.Thread(target=run, name="lfm-mlx-engine", daemon=True).start()
        engine = ready.get()
        if isinstance(engine, BaseException):
            raise engine
        atexit.register(engine.stop)
        return engine

    def stop(self) -> None:
        """End the engine's thread after its current step; running requests get an error."""
        if self._thread is not None:
            self._stopping = True
            self._wakeup.set()
            self._thread.join()
            self._thread = None
            atexit.unregister(self.stop)

    def _loop(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            while not self._jobs.empty():
                self._jobs.get_nowait()()
            try:
                worked = self.step()
            except Exception as e:  # a broken step fails its rows; the engine goes on for the next ones
                traceback.print_exc()
                self._fail_running(e)
                worked = True
            if not worked:
                self._wakeup.wait(timeout=1.0)
        self._fail_running(RuntimeError("the engine was stopped"))
        with self._submit_lock:
            self._closed = True
        while not self._incoming.empty():
            self.waiting.append(self._incoming.get_nowait())
        for gen in self.waiting:
            gen._emit(RuntimeError("the engine was stopped"))
        self.waiting.clear()

    # --- one step: the engine's thread ------------------------------------------------------------

    def step(self) -> bool:
        """Admit, feed one batch, read the last step's tokens, sample. False when there was no work."""
        self._admit()
        sampled_rows, sampled = self._sampled
        reading = [r for r in sampled_rows if r in self.running]
        decode = [r for r in reading if not r.final]
        prefill = self._plan_prefill(bool(decode))
        if not (reading or prefill):
            return False
        self.steps += 1
        feeds = [(r, 1 + self._forced(r) + self._draft(r)) for r in decode] + prefill
        rows, logits = self._forward(feeds) if feeds else ([], None)
        checked = [(r, len(r.drafts)) for r in rows if r.drafts]
        self._read(reading, sampled_rows, sampled)
        verified = self._verify(checked, logits[len(rows):] if checked else None)
        drafted = {id(r) for r, _ in checked}
        alive = [i for i, r in enumerate(rows) if r in self.running and id(r) not in drafted]
        self._sample([rows[i] for i in alive], logits, alive)
        if verified:
            kept, tokens = self._sampled
            self._sampled = (kept + [r for r, _ in verified],
                             mx.concatenate(([tokens] if tokens is not None else []) + [t for _, t in verified]))
        return True

    def _forced(self, row: _Row) -> int:
        """How many tokens ``row``'s constraint forces after its pending token (read back for that)."""
        row.forced = []
        if row.constraint is not None:
            token = row.pending.item()
            if token not in self.eos:
                room = min(row.request.max_tokens - row.text.count - 2, row.chunk_limit() - 1)
                row.forced = row.constraint.fast_forward(token, room)
        return len(row.forced)

    def _draft(self, row: _Row) -> int:
        """How many prompt-lookup drafts ``row`` feeds after its pending and forced tokens: those its
        grammar allows, within its budget and KV window; none once its drafts are rarely right."""
        if row.source is None:
            return 0
        fed = [row.pending.item(), *row.forced]
        if fed[0] in self.eos or (row.drafted >= 24 and row.accepted < 0.3 * row.drafted):
            return 0
        windows = [c.max_size - c.offset for c in row.cache.layers if getattr(c, "max_size", None)]
        room = min(self.draft_tokens, row.request.max_tokens - row.text.count - 2 - len(row.forced),
                   row.chunk_limit() - len(fed), *(w - len(fed) - 1 for w in windows))
        proposal = []
        if room > 0 and (text := continuation(row.source, row.written + self.tokenizer.decode(fed))):
            proposal = self.tokenizer.encode(text, add_special_tokens=False)[:room]
            proposal = proposal[: next((i for i, t in enumerate(proposal) if t in self.eos), len(proposal))]
        if proposal:
            row.drafts = row.constraint.check_drafts(proposal)
            if not row.drafts:
                row.constraint.keep_drafts(0)
        row.step_tokens = len(fed) + len(row.drafts)
        return len(row.drafts)

    def _verify(self, checked: list[tuple[_Row, int]], logits: Optional[mx.array]) -> list[tuple[_Row, mx.array]]:
        """Each drafted row's logits at its last forced position and at each of its ``n`` drafts:
        keep the drafts that masked greedy decoding agrees with, then its own next token; step the
        caches back over the rest. Returns (row, next token) for the rows still running."""
        verified, start = [], 0
        for row, n in checked:
            count = n + 1
            row_logits, start = logits[start : start + count], start + count
            if row not in self.running:  # a stop string ended it in this step's read (drafts undone)
                continue
            choices = []
            for j in range(count):
                position_logits = row_logits[j : j + 1]
                if row.repetition:
                    recent = (list(row.recent) + row.drafts[:j])[-row.recent.maxlen :]
                    position_logits = repeat_penalty(position_logits, [recent], [row.repetition])
                history = mx.concatenate([row.history, mx.array(row.drafts[:j], mx.uint32)]) if j else row.history
                for p in row.processors:
                    position_logits = (row.constraint.masked_at(position_logits, j) if p is row.constraint
                                       else p(history, position_logits))
                choices.append(mx.argmax(position_logits, axis=-1))
            greedy = mx.concatenate(choices).tolist()
            kept = 0
            while kept < len(row.drafts) and row.drafts[kept] == greedy[kept]:
                kept += 1
            self._keep_drafts(row, kept)
            drafts, row.drafts = row.drafts, []
            for token in drafts[:kept]:
                if row in self.running:
                    self._emit_token(row, token, None)
            if row in self.running:
                row.final = row.text.count + 1 >= row.request.max_tokens
                row.pending = mx.array([greedy[kept]], mx.uint32)
                verified.append((row, row.pending))
        return verified

    def _keep_drafts(self, row: _Row, kept: int) -> None:
        """The caches and the constraint after the first ``kept`` of ``row``'s drafts of this step."""
        fed = row.step_tokens
        for c in row.cache.layers:
            c.rewind(fed, fed - len(row.drafts) + kept)
            if hasattr(c, "keep_window"):
                c.keep_window, c.window = False, None
        row.constraint.keep_drafts(kept)
        row.cache.tokens += row.drafts[:kept]
        row.drafted += len(row.drafts)
        row.accepted += kept

    def _drop_cancelled(self) -> None:
        for gen in [g for g in self.waiting if g.cancelled]:
            self.waiting.remove(gen)
            gen._emit(None)
        for row in [r for r in self.running if r.gen.cancelled]:
            self._finish(row)

    def _admit(self) -> None:
        while not self._incoming.empty():
            self.waiting.append(self._incoming.get_nowait())
        self._drop_cancelled()
        while self.waiting and len(self.running) < self.max_batch:
            gen = self.waiting.popleft()
            try:
                self.running.append(_Row(self, gen, self._cache_for(gen.request)))
            except Exception as e:  # this request alone fails
                gen._emit(e)

    def _cache_for(self, request: Request) -> PromptCache:
        if request.prompt_cache is not None:
            return request.prompt_cache
        settings = dict(max_kv_size=request.max_kv_size, keep=request.keep, kv_bits=request.kv_bits)
        reused = self.prefix_cache.lookup(request.prompt, settings) if self.prefix_cache else None
        return reused or PromptCache(self.model, **settings)

    def _look_again(self, row: _Row) -> None:
        """A row that has not started its prompt takes a longer prefix stored since it was admitted
        (requests that arrive together with the same system prompt and schema read it once)."""
        if (self.prefix_cache is None or row.request.prompt_cache is not None or row.fed > row.cached
                or row.prefixes_seen == self.prefix_cache.inserts):
            return
        row.prefixes_seen = self.prefix_cache.inserts
        reused = self.prefix_cache.lookup(row.prompt, row.cache.settings, beyond=row.cached)
        if reused is not None:  # (no copy is made unless it goes further)
            row.adopt(reused)

    def _plan_prefill(self, decoding: bool) -> list[tuple[_Row, int]]:
        """Prompt chunks for this step: shortest remaining prompt first, within the step's budget."""
        budget = self.interleave_tokens if decoding else self.prefill_step_size
        plan = []
        for row in sorted((r for r in self.running if r.prompt_left), key=lambda r: r.prompt_left):
            if budget <= 0:
                break
            self._look_again(row)
            n = min(row.prompt_left, budget, row.chunk_limit())
            plan.append((row, n))
            budget -= n
        return plan

    def _forward(self, feeds: list[tuple[_Row, int]]) -> tuple[list[_Row], mx.array]:
        """Queue one forward pass over all feeds; return the rows that sample now and their logits,
        followed by the logits at each drafted row's verified positions (in the order of ``rows``)."""
        inputs, ends, rows, position, checks = [], [], [], 0, []
        for row, n in feeds:
            if row.pending is not None:
                inputs += [row.pending, mx.array(row.forced + row.drafts, mx.uint32)] if n > 1 else [row.pending]
                if row.drafts:  # the caches step back over rejected drafts: keep the conv windows
                    checks += range(position + n - len(row.drafts) - 1, position + n)
                    for c in row.cache.layers:
                        if hasattr(c, "keep_window"):
                            c.keep_window = True
            else:
                inputs.append(mx.array(row.prompt[row.fed : row.fed + n], mx.uint32))
                inside = any(row.fed < p < row.fed + n for p in row.checkpoints)
                for c in row.cache.layers:
                    if hasattr(c, "keep_window"):
                        c.keep_window = inside
            position += n
            if row.pending is not None or row.fed + n == len(row.prompt):
                ends.append(position - 1)
                rows.append(row)
        ids = mx.concatenate(inputs)[None]
        if len(feeds) == 1:
            hidden = self.model.model(ids, cache=feeds[0][0].cache.layers)
        else:
            hidden = self.model.model(ids, cache=batch_rows([r.cache.layers for r, _ in feeds], [n for _, n in feeds]))
        logits = None
        if rows:
            ends += checks
            picked = hidden[0, ends[0] : ends[0] + 1] if len(ends) == 1 else hidden[0, mx.array(ends)]
            logits = self.model.logits(picked)
        states = []
        for row, n in feeds:
            if row.pending is None:
                self._prompt_fed(row, n)
                states += cache_arrays(row.cache.layers)
        mx.async_eval(*([logits] if logits is not None else []), *states)
        return rows, logits

    def _prompt_fed(self, row: _Row, n: int) -> None:
        chunk = row.prompt[row.fed : row.fed + n]
        row.cache.tokens.extend(chunk)
        row.fed += n
        for p in row.checkpoints:
            if row.fed - n < p <= row.fed:
                row.cache.take_snapshot(at=p)
                if p in row.request.checkpoints and self.prefix_cache is not None and \
                        row.request.prompt_cache is None and not row.cache.rolled:
                    self.prefix_cache.insert(row.cache.branch(p))  # for rows that have not started yet
        for c in row.cache.layers:
            if hasattr(c, "keep_window"):
                c.keep_window, c.window = False, None

    def _read(self, rows: list[_Row], sampled_rows: list[_Row], sampled: Optional[mx.array]) -> None:
        """The tokens sampled last step (``sampled`` holds one per ``sampled_rows``), read back for
        ``rows`` now that this step is queued: their text and endings."""
        if sampled is None or not rows:
            return
        index = {id(r): i for i, r in enumerate(sampled_rows)}
        tokens = sampled.tolist()
        for row in rows:
            token = tokens[index[id(row)]]
            logprobs = row.pending_logprobs
            if not row.final:
                row.cache.tokens += [token, *row.forced]  # fed this step: the cache holds them
            row.pending, row.pending_logprobs = None, None
            try:
                self._emit_token(row, token, logprobs)
                for forced in row.forced:
                    if row not in self.running:  # a stop string ended it
                        break
                    self._emit_token(row, forced, None)
            except Exception as e:  # e.g. a detokenizer or sink failure: this row alone ends
                self._finish(row, e)
            row.forced = []

    def _emit_token(self, row: _Row, token: int, logprobs: Optional[tuple]) -> None:
        now = time.perf_counter()
        if row.first_token_at is None:
            row.first_token_at = now
        text, finish = row.text.add(token)
        if row.source is not None:
            row.written += text
        if row.history is not None and not finish:
            row.history = mx.concatenate([row.history, mx.array([token])])
        if row.recent is not None and not finish:
            row.recent.append(token)
        n = row.text.count
        prompt_s = max(row.first_token_at - row.admitted_at, 1e-9)
        decode_s = now - row.first_token_at
        chosen, top = None, None
        if logprobs is not None:
            chosen = logprobs[0].item()
            top = list(zip(logprobs[1].tolist(), logprobs[2].tolist()))
        row.gen._emit(GenerationResponse(
            text=text, token=token, finish_reason=finish, prompt_tokens=len(row.prompt),
            cached_tokens=row.cached, prompt_tps=(len(row.prompt) - row.cached) / prompt_s,
            generation_tokens=n, generation_tps=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            ttft_s=row.first_token_at - row.gen.submitted_at, peak_memory_mb=mx.get_peak_memory() / 1e6,
            logprob=chosen, top_logprobs=top,
        ))
        if finish:
            self._finish(row)

    def _sample(self, rows: list[_Row], logits: Optional[mx.array], alive: list[int]) -> None:
        """Each row's next token, queued; ``logits`` rows ``alive`` belong to ``rows``."""
        if not rows:
            self._sampled = ([], None)
            return
        if len(alive) < logits.shape[0]:
            logits = logits[mx.array(alive)]
        raw = logits
        if any(r.repetition for r in rows):
            logits = repeat_penalty(logits, [r.recent if r.repetition else () for r in rows],
                                    [r.repetition or 1.0 for r in rows])
        if any(r.processors for r in rows):
            mx.async_eval(logits)  # the forward pass runs while the processors (e.g. a grammar) work
            processed = []
            for i, row in enumerate(rows):
                row_logits = logits[i : i + 1]
                try:
                    for p in row.processors:
                        row_logits = p(row.history, row_logits)
                except Exception as e:  # a grammar that cannot go on, say: this row alone ends
                    self._finish(row, e)
                processed.append(row_logits)
            logits = mx.concatenate(processed)
        groups: dict[SamplingSettings, list[int]] = {}
        for i, row in enumerate(rows):
            if row in self.running:
                groups.setdefault(row.request.sampling, []).append(i)
        picked = [None] * len(rows)
        for settings, members in groups.items():
            draws = None
            if not settings.greedy:  # a handful of ops for all rows: none per row but the split
                keep, draws = split_keys(mx.concatenate([rows[i].key for i in members]))
                for i, key in zip(members, split_rows(keep)):
                    rows[i].key = key
            part = logits if len(members) == len(rows) else logits[mx.array(members)]
            tokens = sample(part, settings, draws)
            for i, token in zip(members, split_rows(tokens)):
                picked[i] = token
        kept = [r for r, t in zip(rows, picked) if t is not None]
        tokens = mx.concatenate([t for t in picked if t is not None]) if kept else None
        for i, row in enumerate(rows):
            if picked[i] is None:
                continue
            row.pending = picked[i]
            row.final = row.text.count + 1 >= row.request.max_tokens
            if row.request.logprobs is not None:
                row.pending_logprobs = _logprobs(raw[i], picked[i], row.request.logprobs)
        pending = [r.pending_logprobs for r in kept if r.pending_logprobs is not None]
        if tokens is not None:
            mx.async_eval(tokens, *[a for lp in pending for a in lp],
                          *[r.history for r in kept if r.history is not None])
        self._sampled = (kept, tokens)

    def _finish(self, row: _Row, error: Optional[BaseException] = None) -> None:
        if row not in self.running:
            return
        self.running.remove(row)
        row.pending = None
        if row.drafts:  # it ended before its drafts were verified: the caches forget them
            self._keep_drafts(row, 0)
            row.drafts = []
        if self.prefix_cache is not None and row.request.prompt_cache is None and not row.cache.rolled:
            row.cache.take_snapshot()
            self.prefix_cache.insert(row.cache)
        row.gen._emit(error)

    def _fail_running(self, error: BaseException) -> None:
        for row in list(self.running):
            if row.request.prompt_cache is not None:
                row.cache.reset()  # a pass that broke half-way may have left it inconsistent
            self._finish(row, error)
        self._sampled = ([], None)


def _logprobs(logits: mx.array, token: mx.array, top: int) -> tuple:
    """(log-probability of ``token``, the ``top`` most likely ids, their log-probabilities)."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = logprobs[token[0]]
    if not top:
        return chosen, mx.array([], mx.int32), mx.array([], logprobs.dtype)
    ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
    order = mx.argsort(-logprobs[ids])
    ids = ids[order]
    return chosen, ids, logprobs[ids]
