"""The token loop: chunked prefill, one-token decode steps, streamed text, stop strings, batches.

Prefill and the decode step are two small functions (gpt-fast's split); ``decode_tokens`` runs the
steps and ``stream_generate`` turns their tokens into text. The next step is queued
(``mx.async_eval``) before the current token is detokenized, so the device never waits on Python.
Speculative decoding by prompt lookup is one more token loop beside it (``prompt_lookup_tokens``).
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

from .cache import ConvCache, KVCache, PromptCache, make_cache
from .sample import SamplingSettings, build_processors, build_sampler
from .tools import TOOL_CALL_END, TOOL_CALL_START, parse_tool_calls

Prompt = Union[str, Sequence[int], Sequence[dict]]


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
    in_tool_call: bool = False  # this text lies inside a <|tool_call_start|>…<|tool_call_end|> span
    tool_calls: Optional[list] = None  # on the last response, when the reply made tool calls


def encode_prompt(tokenizer, prompt: Prompt, tools: Optional[list] = None) -> list[int]:
    """A string is tokenized as is, chat messages go through the chat template, ids pass through."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif len(prompt) and isinstance(prompt[0], dict):
        ids = tokenizer.apply_chat_template(list(prompt), tools=tools, add_generation_prompt=True)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    return ids


def cache_arrays(layers: list) -> list:
    """The arrays that hold the state, to evaluate after each prefill chunk."""
    out = []
    for c in layers:
        if isinstance(c, KVCache):
            out.extend(c.keys + c.values if c.keys is not None else ())
        elif c.state is not None:
            out.append(c.state)
    return out


def prefill_chunk_size(layers: list, requested: int) -> int:
    """Chunks must fit the KV window beside its sinks."""
    windows = [c.max_size - c.keep for c in layers if isinstance(c, KVCache) and c.max_size]
    return min([requested, *windows])


def prefill(model, cache: PromptCache, tokens: Sequence[int], step: int = 512,
            checkpoints: Sequence[int] = ()) -> None:
    """Feed ``tokens`` in chunks so a long prompt never builds full-width activations; snapshot the
    state at each position in ``checkpoints`` (absolute token positions) on the way."""
    step = prefill_chunk_size(cache.layers, step)
    i = 0
    while i < len(tokens):
        start = len(cache.tokens)
        n = min(step, len(tokens) - i)
        n = min([n, *(p - start for p in checkpoints if start < p < start + n)])
        chunk = tokens[i : i + n]
        model.model(mx.array([chunk]), cache=cache.layers)  # hidden states only: no LM head
        mx.eval(cache_arrays(cache.layers))
        cache.tokens.extend(chunk)
        i += n
        if len(cache.tokens) in checkpoints:
            cache.take_snapshot()


class StopMatcher:
    """Stop strings matched across token boundaries: text that could still begin a stop string is
    held back, so a stop string is never shown, even in part."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to show, whether a stop string was hit)."""
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


def _sample(logits: mx.array, history: mx.array, processors: list, sampler: Callable,
            greedy: bool = False) -> mx.array:
    if processors:
        mx.async_eval(logits)  # the forward pass runs while the processors (e.g. a grammar mask) work
        for p in processors:
            logits = p(history, logits)
    if greedy:  # argmax needs no normalisation: skips a 65k-wide exp per token
        return mx.argmax(logits, axis=-1)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs)


def decode_tokens(step: Callable[[mx.array], mx.array], token: int, cache: PromptCache,
                  max_tokens: int) -> Iterator[int]:
    """Plain decoding: ``step`` feeds one token and returns the next, already queued (async_eval).
    Each step is queued before the previous token is read back, so the device never waits on Python;
    ``cache.tokens`` always lists exactly the tokens the cache holds."""
    y = step(mx.array([token]))
    cache.tokens.append(token)
    for n in range(1, max_tokens + 1):
        next_y = step(y) if n < max_tokens else None
        token = y.item()
        if next_y is not None:
            cache.tokens.append(token)
        yield token
        y = next_y


class NgramIndex:
    """Where each n-gram (min_n <= n <= max_n) of a token sequence last occurred with a token after it."""

    def __init__(self, tokens: Sequence[int], max_n: int = 3, min_n: int = 2):
        self.tokens: list[int] = []
        self.max_n, self.min_n = max_n, min_n
        self.next_position: dict[tuple, int] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        end = len(self.tokens) - 1  # the n-grams ending just before the new token now have a successor
        for n in range(self.min_n, min(self.max_n, end) + 1):
            self.next_position[tuple(self.tokens[end - n : end])] = end

    def draft(self, k: int) -> list[int]:
        """The ``k`` tokens that followed the latest earlier occurrence of the longest suffix found.
        A single matching token is too weak a clue: wrong drafts cost a wider verification pass."""
        for n in range(min(self.max_n, len(self.tokens)), self.min_n - 1, -1):
            position = self.next_position.get(tuple(self.tokens[-n:]))
            if position is not None:
                return self.tokens[position : position + k]
        return []


@dataclass
class SpeculativeStats:
    steps: int = 0  # verification passes
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def prompt_lookup_tokens(model, cache: PromptCache, token: int, max_tokens: int, draft_tokens: int = 3,
                         ngram: tuple = (2, 3), stats: Optional[SpeculativeStats] = None,
                         reference: Sequence[int] = ()) -> Iterator[int]:
    """Greedy decoding that guesses ahead by prompt lookup: the tokens that followed the latest earlier
    occurrence of the text's last n-gram are drafted, all checked in one forward pass, and the longest
    prefix that greedy decoding agrees with is kept, plus the model's own next token. The conv states
    rewind to the last kept position by slicing the verification pass's conv window; KV offsets just
    step back. Yields exactly the tokens plain greedy decoding would. ``reference``: more tokens to
    draft from that the model does not read (a predicted output, such as the text being edited)."""
    stats = stats if stats is not None else SpeculativeStats()
    index = NgramIndex([*reference, *cache.tokens, token], max_n=max(ngram), min_n=min(ngram))
    kv = [c for c in cache.layers if isinstance(c, KVCache)]
    for c in cache.layers:
        if isinstance(c, ConvCache):
            c.keep_window = True
    try:
        emitted = 0
        while emitted < max_tokens:
            # Drafts must not roll the KV window: plain decoding would roll it at another moment.
            room = min([draft_tokens, max_tokens - emitted - 1,
                        *(c.max_size - c.offset - 1 for c in kv if c.max_size)])
            draft = index.draft(max(room, 0))
            fed = [token] + draft
            greedy = mx.argmax(model(mx.array([fed]), cache=cache.layers)[0], axis=-1).tolist()
            kept = 1
            while kept < len(fed) and fed[kept] == greedy[kept - 1]:
                kept += 1
            for c in cache.layers:
                c.rewind(len(fed), kept)
            cache.tokens.extend(fed[:kept])
            stats.steps += 1
            stats.drafted += len(draft)
            stats.accepted += kept - 1
            for t in greedy[:kept]:
                index.append(t)
                emitted += 1
                yield t
                if emitted == max_tokens:
                    return
            token = greedy[kept - 1]
    finally:
        for c in cache.layers:
            if isinstance(c, ConvCache):
                c.keep_window, c.window = False, None


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int = 512,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: Optional[int] = None,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    logits_processors: Optional[list] = None,
    tools: Optional[list] = None,
    prompt_cache: Optional[PromptCache] = None,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    keep: int = 4,
    prefill_step_size: int = 512,
    checkpoints: Sequence[int] = (),
    speculative: Union[bool, str, None] = None,
    draft_tokens: int = 3,
) -> Iterator[GenerationResponse]:
    """Yield one ``GenerationResponse`` per generated token. Sampling settings default to the
    checkpoint's generation_config.json (see ``lfm_mlx.sample``). Pass a ``PromptCache`` to reuse
    state across calls: only the part of ``prompt`` that differs from what it holds is prefilled.
    ``speculative="prompt_lookup"`` (or True) drafts up to ``draft_tokens`` tokens at a time from the
    prompt (see ``prompt_lookup_tokens``): the same output as greedy decoding, faster when the reply
    copies from the prompt (extraction, editing); it needs temperature=0 and no logits processors."""
    tokens = encode_prompt(tokenizer, prompt, tools)
    settings = getattr(model, "sampling_defaults", SamplingSettings()).updated(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
    )
    sampler, processors = build_sampler(settings), build_processors(settings, logits_processors)
    greedy = settings.temperature == 0
    if speculative not in (None, False, True, "prompt_lookup"):
        raise ValueError(f"speculative must be 'prompt_lookup' (or True), not {speculative!r}")
    if speculative and (not greedy or processors):
        raise ValueError(
            "speculative decoding reproduces greedy decoding only: pass temperature=0 and "
            "repetition_penalty=1.0, and no logits_processors"
        )
    cache = prompt_cache or PromptCache(model, max_kv_size=max_kv_size, keep=keep, kv_bits=kv_bits)
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    eos = set(tokenizer.eos_token_ids)

    start = time.perf_counter()
    cached = cache.reuse(tokens)
    prefill(model, cache, tokens[cached:-1], prefill_step_size, checkpoints)
    cache.take_snapshot()  # just before the last prompt token: what regenerate() comes back to
    history = mx.array(tokens[:-1])  # every token fed so far, for repetition penalty and grammars

    def step(token: mx.array) -> mx.array:
        nonlocal history
        logits = model(token[None], cache=cache.layers)[:, -1, :]
        if processors:
            history = mx.concatenate([history, token])
        y = _sample(logits, history, processors, sampler, greedy)
        mx.async_eval(y, history)  # evaluating history too keeps it one array, not a growing graph
        return y

    if speculative:
        stream = prompt_lookup_tokens(model, cache, tokens[-1], max_tokens, draft_tokens)
    else:
        stream = decode_tokens(step, tokens[-1], cache, max_tokens)
    with closing(stream):
        yield from _responses(stream, tokenizer, tokens, cached, start, stop, eos, max_tokens)


def _responses(stream: Iterator[int], tokenizer, tokens: list, cached: int, start: float,
               stop: Sequence[str], eos: set, max_tokens: int) -> Iterator[GenerationResponse]:
    """Token ids → streamed text, stop strings, finish reasons, timings and tool-call marks."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    stops = StopMatcher(stop)
    reply, ttft, prompt_tps = "", 0.0, 0.0
    for n, token in enumerate(stream, 1):
        if n == 1:
            ttft = time.perf_counter() - start
            prompt_tps = (len(tokens) - cached) / max(ttft, 1e-9)
            gen_start = time.perf_counter()

        finish = None
        if token in eos:
            finish, segment = "stop", ""
        else:
            detokenizer.add_token(token)
            segment = detokenizer.last_segment
        if finish or n == max_tokens:
            detokenizer.finalize()
            segment += detokenizer.last_segment
        text, hit = stops.feed(segment)
        if hit:
            finish = "stop"
        finish = finish or ("length" if n == max_tokens else None)
        if finish and not hit:
            text += stops.flush()

        was_open = reply.rfind(TOOL_CALL_START) > reply.rfind(TOOL_CALL_END)
        reply += text
        in_tool_call = bool(text) and (was_open or TOOL_CALL_START in text or TOOL_CALL_END in text)
        elapsed = time.perf_counter() - gen_start
        yield GenerationResponse(
            text=text, token=token, finish_reason=finish, prompt_tokens=len(tokens),
            cached_tokens=cached, prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0, ttft_s=ttft,
            peak_memory_mb=mx.get_peak_memory() / 1e6, in_tool_call=in_tool_call,
            tool_calls=(parse_tool_calls(reply) or None) if finish and TOOL_CALL_START in reply else None,
        )
        if finish:
            return


def generate(model, tokenizer, prompt: Prompt, **kwargs) -> str:
    """The whole reply as one string; takes the options of ``stream_generate``."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def batch_generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    row_logits_processors: Optional[Sequence[list]] = None,
    prefill_step_size: int = 512,
    seed: Optional[int] = None,
    on_token: Optional[Callable[[int], None]] = None,
    **sampling,
) -> list[str]:
    """Generate for several prompts at once, left-padded to a common length.

    Pad tokens are masked out of attention and zeroed before the conv (so they never reach its
    state), and each row's RoPE positions start at 0 as if it ran alone: greedy output equals each
    prompt generated by itself. ``row_logits_processors[i]`` apply to row i only (e.g. one grammar
    per document). ``on_token(step)`` is called after each decode step, for progress bars.
    """
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    if not rows:
        return []
    settings = getattr(model, "sampling_defaults", SamplingSettings()).updated(**sampling)
    sampler, shared = build_sampler(settings), build_processors(settings)
    row_processors = [shared + list(p) for p in (row_logits_processors or [[] for _ in rows])]
    if seed is not None:
        mx.random.seed(seed)

    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    pad_id = tokenizer.pad_token_id or 0
    padded = mx.array([[pad_id] * p + r for p, r in zip(padding, rows)])
    layers = make_cache(model, max_kv_size=0, left_padding=padding)
    for i in range(0, width - 1, prefill_step_size):
        model.model(padded[:, i : min(i + prefill_step_size, width - 1)], cache=layers)
        mx.eval(cache_arrays(layers))

    eos = set(tokenizer.eos_token_ids)
    histories = [list(r) for r in rows]
    generated: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    y = padded[:, -1:]
    for n in range(max_tokens):
        logits = model(y, cache=layers)[:, -1, :]
        if any(row_processors):
            mx.async_eval(logits)
            logits = mx.concatenate([
                _apply([] if done[i] else procs, mx.array(h), logits[i : i + 1])
                for i, (procs, h) in enumerate(zip(row_processors, histories))
            ])
        tokens = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        values = tokens.tolist()
        for i, t in enumerate(values):
            histories[i].append(t)
            if not done[i]:
                if t in eos:
                    done[i] = True
                else:
                    generated[i].append(t)
                    if stop and any(s in tokenizer.decode(generated[i][-32:]) for s in stop):
                        done[i] = True
        if on_token:
            on_token(n)
        if all(done):
            break
        y = tokens[:, None]

    texts = [tokenizer.decode(g) for g in generated]
    return [_cut_at_stop(t, stop) for t in texts]


def _apply(processors: list, history: mx.array, logits: mx.array) -> mx.array:
    for p in processors:
        logits = p(history, logits)
    return logits


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(cuts)] if cuts else text
