"""The token loop: chunked prefill, one-token decode steps, streamed text, stop strings, batches.

Prefill and the decode step are two small functions (gpt-fast's split); ``stream_generate`` drives
them and turns tokens into text. The next step is queued (``mx.async_eval``) before the current token
is detokenized, so the device never waits on Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

from .cache import KVCache, PromptCache, make_cache
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


def _sample(logits: mx.array, history: mx.array, processors: list, sampler: Callable) -> mx.array:
    if processors:
        mx.async_eval(logits)  # the forward pass runs while the processors (e.g. a grammar mask) work
        for p in processors:
            logits = p(history, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs)


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
) -> Iterator[GenerationResponse]:
    """Yield one ``GenerationResponse`` per generated token. Sampling settings default to the
    checkpoint's generation_config.json (see ``lfm_mlx.sample``). Pass a ``PromptCache`` to reuse
    state across calls: only the part of ``prompt`` that differs from what it holds is prefilled."""
    tokens = encode_prompt(tokenizer, prompt, tools)
    settings = getattr(model, "sampling_defaults", SamplingSettings()).updated(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
    )
    sampler, processors = build_sampler(settings), build_processors(settings, logits_processors)
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
        y = _sample(logits, history, processors, sampler)
        mx.async_eval(y, history)  # evaluating history too keeps it one array, not a growing graph
        return y

    y = step(mx.array(tokens[-1:]))
    cache.tokens.append(tokens[-1])

    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    stops = StopMatcher(stop)
    reply, ttft, prompt_tps = "", 0.0, 0.0
    for n in range(1, max_tokens + 1):
        next_y = None
        if n < max_tokens:
            next_y = step(y)  # queued before we wait on y: the device stays busy
        token = y.item()
        if next_y is not None:
            cache.tokens.append(token)
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
        y = next_y


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
