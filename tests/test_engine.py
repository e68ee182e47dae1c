"""The continuous-batching engine: rows joining and leaving, each equal to its prompt generated alone."""

from __future__ import annotations

import gc
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

import conftest
import lfm_mlx
from conftest import EOS, ban, forcing
from lfm_mlx.cache import KVCache
from lfm_mlx.constrain import JSONConstraint
from lfm_mlx.engine import Engine, Request, continuation
from lfm_mlx.sample import SamplingSettings

GREEDY = SamplingSettings(**conftest.GREEDY)  # the engine takes settings objects


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 60000, size=int(rng.integers(3, 90))).tolist() for _ in range(n)]


def alone(model, tok, request: Request) -> list[int]:
    return [r.token for r in Engine(model, tok, max_batch=1).submit(request)]


def staggered(engine: Engine, requests: list[Request], gaps: list[int]) -> list[list[int]]:
    """Submit each request after ``gaps[i]`` more engine steps, then run everything to the end."""
    generations = []
    for request, gap in zip(requests, gaps):
        for _ in range(gap):
            engine.step()
        generations.append(engine.submit(request))
    return [[r.token for r in g] for g in generations]


def test_rows_joining_at_different_steps_equal_each_prompt_alone(tiny):
    model, tok = tiny
    requests = [Request(p, max_tokens=12 + 3 * i, sampling=GREEDY, logits_processors=[ban(EOS)])
                for i, p in enumerate(prompts(6))]
    together = staggered(Engine(model, tok, max_batch=4, interleave_tokens=16), requests, [0, 0, 3, 1, 5, 0])
    assert together == [alone(model, tok, r) for r in requests]
    assert len({tuple(t) for t in together}) == len(requests)


def test_rows_with_repetition_penalties_equal_a_plain_loop_with_mlx_lms_processor(tiny):
    """The engine applies every row's penalty in one gather and scatter: each row's tokens are those of
    a one-sequence loop that calls mlx-lm's processor over the prompt and the reply so far."""
    from mlx_lm.sample_utils import make_repetition_penalty

    from lfm_mlx.cache import make_cache

    model, tok = tiny
    settings = [SamplingSettings(temperature=0.0, repetition_penalty=p, repetition_context_size=c)
                for p, c in ((1.5, 64), (1.0, 64), (3.0, 8), (0.5, 16))]

    def plain(prompt: list[int], s: SamplingSettings, n: int) -> list[int]:
        cache, tokens, out = make_cache(model), list(prompt), []
        penalize, keep_going = make_repetition_penalty(s.repetition_penalty, s.repetition_context_size), ban(EOS)
        logits = model(mx.array([prompt]), cache=cache)[:, -1]
        for _ in range(n):
            token = mx.argmax(keep_going(None, penalize(mx.array(tokens), logits)), axis=-1).item()
            out.append(token)
            tokens.append(token)
            logits = model(mx.array([[token]]), cache=cache)[:, -1]
        return out

    ps = prompts(4, seed=5)
    requests = [Request(p, max_tokens=20, sampling=s, logits_processors=[ban(EOS)]) for p, s in zip(ps, settings)]
    together = staggered(Engine(model, tok, max_batch=4, interleave_tokens=16), requests, [0, 2, 0, 3])
    assert together == [plain(p, s, 20) for p, s in zip(ps, settings)]


@pytest.mark.parametrize("cache_options", [dict(max_kv_size=48), dict(kv_bits=8), dict(max_kv_size=40, kv_bits=4)])
def test_rows_with_their_own_windows_and_kv_bits_equal_each_alone(tiny, cache_options):
    model, tok = tiny
    rng = np.random.default_rng(1)
    requests = [Request(p, max_tokens=40, sampling=GREEDY, logits_processors=[ban(EOS)],
                        **(cache_options if i % 2 else {}))
                for i, p in enumerate(rng.integers(100, 60000, size=(4, 30)).tolist())]
    together = staggered(Engine(model, tok, max_batch=4), requests, [0, 2, 0, 7])
    assert together == [alone(model, tok, r) for r in requests]


def test_rows_with_json_constraints_equal_each_alone(tiny):
    model, tok = tiny
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"]}

    def request(p):
        c = JSONConstraint(tok, schema, vocab_size=model.args.vocab_size, max_tokens=40)
        return Request(p, max_tokens=40, sampling=GREEDY, logits_processors=[c])

    ps = prompts(3, seed=2)
    together = staggered(Engine(model, tok), [request(p) for p in ps], [0, 1, 2])
    assert together == [alone(model, tok, request(p)) for p in ps]
    import json
    for tokens in together:
        data = json.loads(tok.decode([t for t in tokens if t != EOS]))
        assert set(data) == {"name", "n"}


def test_seeded_sampling_reproduces_whatever_runs_beside_it(tiny):
    model, tok = tiny
    hot = SamplingSettings(temperature=1.0, top_k=0, repetition_penalty=1.0)
    target = Request(prompts(1, seed=3)[0], max_tokens=20, sampling=hot, seed=42, logits_processors=[ban(EOS)])
    solo = alone(model, tok, target)
    others = [Request(p, max_tokens=15, sampling=SamplingSettings(temperature=0.7), seed=i)
              for i, p in enumerate(prompts(3, seed=4))]
    batched = staggered(Engine(model, tok), [others[0], target, *others[1:]], [0, 2, 0, 1])[1]
    assert batched == solo
    other_seed = alone(model, tok, Request(target.prompt, max_tokens=20, sampling=hot, seed=43,
                                           logits_processors=[ban(EOS)]))
    assert other_seed != solo


def test_a_cancelled_row_leaves_within_a_step_and_the_others_go_on(tiny):
    model, tok = tiny
    engine = Engine(model, tok)
    keep = engine.submit(Request(prompts(1)[0], max_tokens=30, sampling=GREEDY, logits_processors=[ban(EOS)]))
    drop = engine.submit(Request(prompts(1, seed=5)[0], max_tokens=10_000, sampling=GREEDY,
                                 logits_processors=[ban(EOS)]))
    for _ in range(4):
        engine.step()
    drop.cancel()
    engine.step()
    assert len(engine.running) == 1 and drop.finished
    assert len([r for r in keep]) == 30


def test_a_failing_processor_ends_only_its_own_row(tiny):
    model, tok = tiny

    def broken(history, logits):
        raise RuntimeError("grammar went wrong")

    engine = Engine(model, tok)
    good = engine.submit(Request(prompts(1)[0], max_tokens=8, sampling=GREEDY, logits_processors=[ban(EOS)]))
    bad = engine.submit(Request(prompts(1, seed=6)[0], max_tokens=8, sampling=GREEDY, logits_processors=[broken]))
    with pytest.raises(RuntimeError, match="grammar went wrong"):
        list(bad)
    assert len(list(good)) == 8
    assert len(list(engine.submit(Request([5, 6, 7], max_tokens=3, sampling=GREEDY)))) >= 1


def test_logprobs_are_the_models_log_softmax(tiny):
    model, tok = tiny
    prompt = prompts(1, seed=7)[0]
    responses = list(Engine(model, tok).submit(Request(prompt, max_tokens=4, sampling=GREEDY, logprobs=3,
                                                       logits_processors=[ban(EOS)])))
    ids = list(prompt)
    for r in responses:
        logits = model(mx.array([ids]))[0, -1]
        expected = np.array(logits - mx.logsumexp(logits))
        assert r.logprob == pytest.approx(float(expected[r.token]), abs=1e-4)
        top_ids = [t for t, _ in r.top_logprobs]
        assert top_ids == list(np.argsort(-expected)[:3])
        assert [lp for _, lp in r.top_logprobs] == pytest.approx(sorted(expected, reverse=True)[:3], abs=1e-4)
        ids.append(r.token)


def test_prefix_cache_reuses_a_shared_prefix_at_a_snapshot_and_changes_nothing(tiny):
    model, tok = tiny
    shared = prompts(1, seed=8)[0] + prompts(1, seed=9)[0]
    first = shared + [11, 12, 13]
    second = shared + [21, 22]
    engine = Engine(model, tok, prefix_cache_bytes=64 << 20)
    list(engine.submit(Request(first, max_tokens=5, sampling=GREEDY, checkpoints=[len(shared)])))
    responses = list(engine.submit(Request(second, max_tokens=6, sampling=GREEDY, logits_processors=[ban(EOS)])))
    assert responses[-1].cached_tokens == len(shared)
    assert [r.token for r in responses] == alone(model, tok, Request(second, max_tokens=6, sampling=GREEDY,
                                                                        logits_processors=[ban(EOS)]))
    again = list(engine.submit(Request(second, max_tokens=6, sampling=GREEDY, logits_processors=[ban(EOS)])))
    assert again[-1].cached_tokens == len(second) - 1  # the snapshot before its last prompt token


def test_requests_arriving_together_read_their_shared_prefix_once(tiny):
    """The first row to pass a message boundary stores its state there; rows that have not started their
    prompt take it (cached_tokens), and each reply is still the one its prompt gets alone."""
    model, tok = tiny
    shared = (prompts(1, seed=10)[0] * 3)[:60]
    tails = [[31, 32], [41, 42, 43, 44], [51, 52, 53, 54, 55, 56]]
    requests = [Request(shared + t, max_tokens=6, sampling=GREEDY, logits_processors=[ban(EOS)],
                        checkpoints=[len(shared)]) for t in tails]
    engine = Engine(model, tok, max_batch=3, prefill_step_size=61, prefix_cache_bytes=64 << 20)
    generations = [engine.submit(r) for r in requests]
    replies = [list(g) for g in generations]
    assert [r[-1].cached_tokens for r in replies] == [0, len(shared), len(shared)]
    assert [[r.token for r in reply] for reply in replies] == [
        alone(model, tok, Request(r.prompt, max_tokens=6, sampling=GREEDY, logits_processors=[ban(EOS)]))
        for r in requests]


def test_prefix_cache_stays_within_its_byte_budget(tiny):
    model, tok = tiny
    engine = Engine(model, tok, prefix_cache_bytes=2 << 20)
    for p in prompts(12, seed=10):
        list(engine.submit(Request(p * 4, max_tokens=2, sampling=GREEDY)))
    assert 0 < engine.prefix_cache.nbytes <= 2 << 20
    # ... in memory too: no snapshot keeps a prompt chunk's whole conv window alive.
    gc.collect()
    held = mx.get_active_memory()
    counted = engine.prefix_cache.nbytes
    engine.prefix_cache.clear()
    gc.collect()
    assert held - mx.get_active_memory() <= 1.1 * counted


def test_prefix_cache_entries_hold_the_kv_of_their_tokens_only(tiny):
    """KV storage grows 256 tokens at a time; a stored entry is never written again, so it keeps only
    what its tokens use (and its reuse is tested above)."""
    model, tok = tiny
    engine = Engine(model, tok, prefix_cache_bytes=64 << 20)
    list(engine.submit(Request(prompts(1, seed=12)[0], max_tokens=3, sampling=GREEDY)))
    (_, cache, size, _), = engine.prefix_cache._entries.values()
    kv = [c for c in cache.layers if isinstance(c, KVCache)]
    assert kv and all(c.keys[0].shape[2] == c.values[0].shape[2] == c.offset == len(cache.tokens) < 256 for c in kv)
    assert size == cache.nbytes == engine.prefix_cache.nbytes


def test_snapshot_inside_a_prefill_chunk_equals_one_taken_at_a_chunk_boundary(tiny):
    model, tok = tiny
    prompt = np.random.default_rng(11).integers(100, 60000, size=120).tolist()
    inside, split = lfm_mlx.PromptCache(model), lfm_mlx.PromptCache(model)
    list(Engine(model, tok, prefill_step_size=4096).submit(
        Request(prompt, max_tokens=1, sampling=GREEDY, prompt_cache=inside, checkpoints=[50])))
    from lfm_mlx.generate import prefill
    prefill(model, split, prompt[:50])
    at_50 = inside.snapshots[50]
    expected = [getattr(c, "state", None) for c in split.layers]
    for got, want in zip(at_50.conv_states, expected):
        if want is not None:
            assert np.abs(np.array(got) - np.array(want)).max() < 1e-5
    assert set(at_50.offsets) == {50}


def test_invalid_requests_are_refused_before_they_are_queued(tiny):
    model, tok = tiny
    engine = Engine(model, tok)
    for bad, message in [(dict(prompt=[]), "empty"), (dict(prompt=[70000]), "token ids"),
                         (dict(prompt=[5], max_tokens=0), "max_tokens"),
                         (dict(prompt=[5], sampling=SamplingSettings(top_k=100_000)), "top_k"),
                         (dict(prompt=[5], logprobs=50), "logprobs")]:
        with pytest.raises(ValueError, match=message):
            engine.submit(Request(**bad))
    assert engine.occupancy == (0, 0)


def test_threaded_engine_serves_concurrent_callers_without_cross_talk(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=8).start()
    requests = [Request(p, max_tokens=10, sampling=GREEDY, logits_processors=[ban(EOS)]) for p in prompts(8, seed=12)]
    results: dict[int, list[int]] = {}

    def client(i):
        results[i] = [r.token for r in engine.submit(requests[i])]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(8)] == [alone(model, tok, r) for r in requests]
    # A job runs on the engine's thread, between steps.
    assert engine.call(threading.current_thread).name == "lfm-mlx-engine"
    engine.stop()
    assert not engine.threaded


def test_a_stopped_engine_ends_its_requests_with_an_error_and_refuses_new_ones(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2).start()
    endless = [Request(p, max_tokens=100_000, sampling=GREEDY, logits_processors=[ban(EOS)]) for p in prompts(3, seed=5)]
    generations = [engine.submit(r) for r in endless]  # two run, one waits
    deadline = time.monotonic() + 60
    while engine.occupancy != (2, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    for generation in generations:
        with pytest.raises(RuntimeError, match="the engine was stopped"):
            list(generation)
    with pytest.raises(RuntimeError, match="the engine has stopped"):
        engine.submit(endless[0])


def test_forced_tokens_stream_as_text_with_stop_strings(tiny):
    model, tok = tiny
    text = "alpha beta STOP gamma"
    ids = tok.encode(text, add_special_tokens=False)
    r = list(Engine(model, tok).submit(Request([5, 6], max_tokens=40, sampling=GREEDY, stop=["STOP"],
                                               logits_processors=[forcing(ids)])))
    assert "".join(x.text for x in r) == "alpha beta " and r[-1].finish_reason == "stop"


def test_prompt_lookup_continues_the_longest_end_of_the_reply_found_in_the_prompt():
    source = "Contact Dr. Amara Okafor, Head of Procurement. Okafor's email: amara@x.io"
    assert continuation(source, '{"name": "Dr. Amara', chars=8) == " Okafor,"
    assert continuation(source, '"email": "Okafor', chars=4) == "'s e"  # the latest occurrence
    assert continuation(source, '"x": "zz', chars=8) == ""
    assert continuation(source, "ab", chars=8) == ""  # under 3 characters: too weak a clue
