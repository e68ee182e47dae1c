"""Generation for callers: prompts in any form, streamed responses, batches, speculative lookup.

Every token loop runs in ``lfm_mlx.engine`` (continuous batching). ``stream_generate`` submits one
request to it, ``batch_generate`` many; with ``engine=`` they join an engine that other callers share.
Prefill and the one-token decode step stay two small functions for the benchmark and for speculative
decoding by prompt lookup, which is one more function beside them (``prompt_lookup_tokens``), not a
mode threaded through the engine.
"""

from __future__ import annotations

import threading
import time
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

from .cache import ConvCache, KVCache, PromptCache, cache_arrays
from .engine import Engine, GenerationResponse, ReplyText, Request, StopMatcher
from .sample import SamplingSettings
from .tools import TOOL_CALL_END, TOOL_CALL_START, format_tool_calls, parse_tool_calls

Prompt = Union[str, Sequence[int], Sequence[dict]]

__all__ = ["GenerationResponse", "Prompt", "StopMatcher", "batch_generate", "encode_prompt", "generate",
           "message_starts", "prefill", "prompt_lookup_tokens", "sampling_settings", "stream_generate"]


def encode_prompt(tokenizer, prompt: Prompt, tools: Optional[list] = None) -> list[int]:
    """A string is tokenized as is, chat messages go through the chat template, ids pass through."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif len(prompt) and isinstance(prompt[0], dict):
        ids = tokenizer.apply_chat_template(_calls_in_content(tokenizer, prompt), tools=tools,
                                            add_generation_prompt=True)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    return ids


def _calls_in_content(tokenizer, messages: Sequence[dict]) -> list[dict]:
    """LFM2's first chat template ignores an assistant message's ``tool_calls``: for such a template,
    write them after the content, as LFM2.5's template renders them, so the model sees its own calls."""
    if "tool_calls" in (getattr(tokenizer, "chat_template", None) or "") or not any(
            isinstance(m, dict) and m.get("tool_calls") for m in messages):
        return list(messages)
    written = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [call.get("function", call) for call in m["tool_calls"]]
            calls = [{"name": c["name"], "arguments": c.get("arguments") or {}} for c in calls]
            m = {**{k: v for k, v in m.items() if k != "tool_calls"},
                 "content": (m.get("content") or "") + format_tool_calls(calls)}
        written.append(m)
    return written


def message_starts(tokenizer, ids: Sequence[int]) -> list[int]:
    """Positions where a chat message begins (its ``<|im_start|>``): where a later conversation that
    shares the earlier messages departs from this one, so where prefix-cache snapshots pay off."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if not isinstance(start, int) or start == getattr(tokenizer, "unk_token_id", None):
        return []
    return [i for i, t in enumerate(ids) if t == start and i > 0]


def sampling_settings(defaults: Optional[SamplingSettings] = None, **overrides) -> SamplingSettings:
    """``defaults`` (a checkpoint's generation config, ``read_generation_config``; None: Liquid's
    recommended settings) with the caller's overrides (None keeps a default)."""
    return (defaults or SamplingSettings()).updated(**overrides)


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


def decode_tokens(step: Callable[[mx.array], mx.array], token: int, cache: PromptCache,
                  max_tokens: int) -> Iterator[int]:
    """Plain one-sequence decoding, for the benchmark's decode measurements: ``step`` feeds one token
    and returns the next, already queued (async_eval), so the device never waits on Python;
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
    logprobs: Optional[int] = None,
    tools: Optional[list] = None,
    prompt_cache: Optional[PromptCache] = None,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    keep: int = 4,
    prefill_step_size: int = 512,
    checkpoints: Sequence[int] = (),
    speculative: Union[bool, str, None] = None,
    draft_tokens: int = 3,
    engine: Optional[Engine] = None,
    cancel: Optional[threading.Event] = None,
    defaults: Optional[SamplingSettings] = None,
) -> Iterator[GenerationResponse]:
    """Yield one ``GenerationResponse`` per generated token. Sampling settings left out come from
    ``defaults`` (e.g. ``read_generation_config(path)``), else Liquid's recommended ones. Pass a ``PromptCache`` to reuse
    state across calls: only the part of ``prompt`` that differs from what it holds is prefilled.
    ``engine``: run as one row of a shared (e.g. threaded) engine instead of one of its own;
    ``cancel``: an event that, once set (from any thread), ends the generation within a step.
    ``logprobs=k``: each response carries its token's log-probability and the k likeliest.
    ``speculative="prompt_lookup"`` (or True) drafts up to ``draft_tokens`` tokens at a time from the
    prompt (see ``prompt_lookup_tokens``): the same output as greedy decoding, faster when the reply
    copies from the prompt (extraction, editing); it needs temperature=0 and no logits processors."""
    tokens = encode_prompt(tokenizer, prompt, tools)
    settings = sampling_settings(
        defaults, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size)
    if speculative not in (None, False, True, "prompt_lookup"):
        raise ValueError(f"speculative must be 'prompt_lookup' (or True), not {speculative!r}")
    if speculative:
        if not settings.greedy or settings.repetition_penalty != 1.0 or logits_processors:
            raise ValueError(
                "speculative decoding reproduces greedy decoding only: pass temperature=0 and "
                "repetition_penalty=1.0, and no logits_processors"
            )
        cache = prompt_cache or PromptCache(model, max_kv_size=max_kv_size, keep=keep, kv_bits=kv_bits)
        stream = _speculative(model, tokenizer, tokens, cache, max_tokens, stop, draft_tokens,
                              prefill_step_size, checkpoints)
    else:
        request = Request(tokens, max_tokens=max_tokens, sampling=settings, seed=seed, stop=stop,
                          logits_processors=logits_processors or (), logprobs=logprobs,
                          prompt_cache=prompt_cache, checkpoints=checkpoints, max_kv_size=max_kv_size,
                          kv_bits=kv_bits, keep=keep, cancel=cancel)
        if engine is None:
            engine = Engine(model, tokenizer, max_batch=1, prefill_step_size=prefill_step_size)
            mx.reset_peak_memory()
        stream = iter(engine.submit(request))
    with closing(stream):
        yield from with_tool_calls(stream)


def with_tool_calls(responses: Iterator[GenerationResponse]) -> Iterator[GenerationResponse]:
    """Mark text inside tool-call spans, and parse the calls onto the last response."""
    open_call, seen_call, reply = False, False, []
    for r in responses:
        if r.text:
            in_call = open_call or TOOL_CALL_START in r.text or TOOL_CALL_END in r.text
            reply.append(r.text)
            start, end = r.text.rfind(TOOL_CALL_START), r.text.rfind(TOOL_CALL_END)
            open_call = start > end if start >= 0 or end >= 0 else open_call
            seen_call = seen_call or start >= 0
            r = replace(r, in_tool_call=in_call)
        if r.finish_reason and seen_call:
            r = replace(r, tool_calls=parse_tool_calls("".join(reply)) or None)
        yield r


def _speculative(model, tokenizer, tokens: list[int], cache: PromptCache, max_tokens: int,
                 stop: Sequence[str], draft_tokens: int, prefill_step_size: int,
                 checkpoints: Sequence[int]) -> Iterator[GenerationResponse]:
    """Greedy decoding by prompt lookup, as responses."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    cached = cache.reuse(tokens)
    prefill(model, cache, tokens[cached:-1], prefill_step_size, checkpoints)
    cache.take_snapshot()  # just before the last prompt token: what regenerate() comes back to
    text = ReplyText(tokenizer, stop, set(tokenizer.eos_token_ids), max_tokens)
    stream = prompt_lookup_tokens(model, cache, tokens[-1], max_tokens, draft_tokens)
    with closing(stream):
        for token in stream:
            now = time.perf_counter()
            if text.count == 0:
                first = now
            piece, finish = text.add(token)
            yield GenerationResponse(
                text=piece, token=token, finish_reason=finish, prompt_tokens=len(tokens),
                cached_tokens=cached, prompt_tps=(len(tokens) - cached) / max(first - start, 1e-9),
                generation_tokens=text.count,
                generation_tps=(text.count - 1) / (now - first) if now > first else 0.0,
                ttft_s=first - start, peak_memory_mb=mx.get_peak_memory() / 1e6)
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
    max_batch: int = 32,
    engine: Optional[Engine] = None,
    defaults: Optional[SamplingSettings] = None,
    **sampling,
) -> list[str]:
    """Generate for several prompts at once through the engine: rows join as others leave, each
    equal to its prompt generated alone (greedy). ``row_logits_processors[i]`` apply to row i only
    (e.g. one grammar per document); row i samples with seed ``seed + i``."""
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    settings = sampling_settings(defaults, **sampling)
    processors = row_logits_processors or [() for _ in rows]
    if len(processors) != len(rows):
        raise ValueError(f"row_logits_processors has {len(processors)} entries for {len(rows)} prompts")
    engine = engine or Engine(model, tokenizer, max_batch=max_batch, prefill_step_size=prefill_step_size)
    requests = (Request(r, max_tokens=max_tokens, sampling=settings, stop=stop, logits_processors=p,
                        seed=None if seed is None else seed + i) for i, (r, p) in enumerate(zip(rows, processors)))
    texts: list[list[str]] = [[] for _ in rows]
    for i, item in engine.stream_many(requests):
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            texts[i].append(item.text)
    return ["".join(t) for t in texts]
