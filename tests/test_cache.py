"""The hybrid cache: rolling KV window with sinks, quantized KV, snapshots and prefix reuse."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import lfm_mlx
from conftest import EOS, GREEDY, ban
from lfm_mlx.cache import ConvCache, KVCache, PromptCache, restore, snapshot
from lfm_mlx.generate import prefill



def kv_caches(layers):
    return [c for c in layers if isinstance(c, KVCache)]


def test_rolling_cache_matches_unbounded_cache_inside_window(tiny):
    model, tok = tiny
    prompt = list(np.random.default_rng(0).integers(100, 60000, size=100))
    opts = dict(max_tokens=150, logits_processors=[ban(EOS)], **GREEDY)
    unbounded = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_kv_size=0, **opts)]
    rolling = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_kv_size=256, **opts)]
    assert len(prompt) + len(rolling) <= 256 and rolling == unbounded


def test_rolling_logits_equal_full_cache_until_the_window_fills(tiny):
    model, _ = tiny
    ids = np.random.default_rng(1).integers(100, 60000, size=(1, 64))
    full = np.array(model(mx.array(ids)))
    layers = lfm_mlx.make_cache(model, max_kv_size=64, keep=4)
    step = [np.array(model(mx.array(ids[:, i : i + 1]), cache=layers)) for i in range(64)]
    assert np.abs(np.concatenate(step, axis=1) - full).max() / np.abs(full).max() < 1e-5


def test_rolling_cache_keeps_memory_flat_and_positions_bounded(tiny):
    model, tok = tiny
    cache = PromptCache(model, max_kv_size=256)
    memory, max_offset = {}, 0
    for r in lfm_mlx.stream_generate(model, tok, "Tell me a long story", max_tokens=4000, prompt_cache=cache,
                                     logits_processors=[ban(EOS)], **GREEDY):
        max_offset = max(max_offset, *(c.offset for c in kv_caches(cache.layers)))
        if r.generation_tokens in (1000, 4000):
            memory[r.generation_tokens] = mx.get_active_memory()
    print(f"active memory with max_kv_size=256: {memory[1000] / 1e6:.2f} MB at 1k, {memory[4000] / 1e6:.2f} MB at 4k")
    assert r.generation_tokens == 4000
    assert max_offset <= 256
    assert abs(memory[4000] - memory[1000]) <= 0.05 * memory[1000]
    assert all(c.keys[0].shape[2] <= 256 for c in kv_caches(cache.layers))
    assert all(c.evictions > 0 for c in kv_caches(cache.layers))


def test_rolled_keys_equal_keys_computed_at_their_new_positions(tiny):
    """After a roll, each kept key must be exactly what RoPE gives at its new cache position."""
    model, _ = tiny
    attn = next(l for l in model.layers if l.is_attention).self_attn
    cache = KVCache(max_size=32, keep=4, rope=attn.rope)
    raw = mx.random.normal((1, 2, 40, attn.head_dim), key=mx.random.key(0))
    for i in range(40):
        pos = cache.prepare(1)
        k = attn.rope(raw[:, :, i : i + 1], offset=pos)
        cache.update_and_fetch(k, k)
    assert cache.offset <= 32 and cache.evictions >= 1
    kept = cache.offset
    # Sinks are tokens 0..3; the rest are the most recent `kept - 4` tokens, now at positions 4..kept-1.
    recent = raw[:, :, 40 - (kept - 4) :]
    expected = mx.concatenate([attn.rope(raw[:, :, :4]), attn.rope(recent, offset=4)], axis=2)
    assert mx.abs(cache.keys[0][:, :, :kept] - expected).max().item() < 1e-4


def test_kv_window_too_small_for_a_chunk_is_a_clear_error(tiny):
    model, _ = tiny
    layers = lfm_mlx.make_cache(model, max_kv_size=16, keep=4)
    model(mx.array([[5] * 12]), cache=layers)
    with pytest.raises(ValueError, match="do not fit a KV window of 16"):
        model(mx.array([[5] * 14]), cache=layers)
    with pytest.raises(ValueError, match="larger than keep"):
        lfm_mlx.make_cache(model, max_kv_size=4, keep=4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_tracks_float_kv(tiny, bits):
    model, _ = tiny
    ids = np.random.default_rng(2).integers(100, 60000, size=(1, 48))
    full = np.array(model(mx.array(ids)))
    layers = lfm_mlx.make_cache(model, kv_bits=bits)
    model(mx.array(ids[:, :40]), cache=layers)
    out = np.concatenate([np.array(model(mx.array(ids[:, i : i + 1]), cache=layers)) for i in range(40, 48)], axis=1)
    err = np.abs(out - full[:, 40:]).max() / np.abs(full).max()
    assert err < (0.02 if bits == 8 else 0.1)
    assert kv_caches(layers)[0].keys[0].dtype == mx.uint32


def test_quantized_rolling_cache_generates_past_its_window(tiny):
    model, tok = tiny
    cache = PromptCache(model, max_kv_size=64, kv_bits=8)
    out = list(lfm_mlx.stream_generate(model, tok, "Go", max_tokens=200, prompt_cache=cache,
                                       logits_processors=[ban(EOS)], **GREEDY))
    assert len(out) == 200 and all(c.offset <= 64 for c in kv_caches(cache.layers))


def test_restored_snapshot_continues_exactly_like_a_fresh_prefill(tiny):
    model, _ = tiny
    ids = np.random.default_rng(3).integers(100, 60000, size=90).tolist()
    cache = PromptCache(model)
    prefill(model, cache, ids[:50], checkpoints=[30])
    assert 30 in cache.snapshots
    assert cache.reuse(ids[:30] + [11, 12, 13]) == 30
    prefill(model, cache, ids[30:89])
    resumed = np.array(model(mx.array([ids[89:]]), cache=cache.layers))

    fresh = PromptCache(model)
    prefill(model, fresh, ids[:89])
    expected = np.array(model(mx.array([ids[89:]]), cache=fresh.layers))
    assert np.abs(resumed - expected).max() / np.abs(expected).max() < 1e-5
    assert int(resumed.argmax()) == int(expected.argmax())


def test_snapshot_is_refused_after_the_window_rolled(tiny):
    model, _ = tiny
    layers = lfm_mlx.make_cache(model, max_kv_size=32)
    model(mx.array([[5] * 20]), cache=layers)
    snap = snapshot(layers)
    model(mx.array([[6] * 20]), cache=layers)
    before = [c.offset for c in layers]
    assert restore(layers, snap) is False
    assert [c.offset for c in layers] == before


def test_reuse_keeps_the_live_state_when_the_prompt_extends_it(tiny):
    model, _ = tiny
    cache = PromptCache(model)
    prefill(model, cache, [5, 6, 7, 8])
    assert cache.reuse([5, 6, 7, 8, 9, 10]) == 4
    assert cache.reuse([5, 6, 7, 8]) == 0 and cache.tokens == []  # no snapshot at 3: start over
    assert all(c.offset == 0 for c in cache.layers if isinstance(c, (KVCache, ConvCache)))


class StoredState:
    """What ``PrefixCache`` reads of a ``PromptCache``: its tokens, snapshot positions, settings and size;
    ``branch(p)`` says where a reuse was taken."""

    def __init__(self, tokens: list[int], snapshots: list[int], settings: dict, nbytes: int = 100):
        self.tokens, self.snapshots, self.settings, self.nbytes = tokens, dict.fromkeys(snapshots), settings, nbytes
        self.rolled = False

    def shrink(self) -> None:
        """(No KV buffers to cut.)"""

    def branch(self, position: int) -> tuple:
        return tuple(self.tokens[:position]), position, tuple(sorted(self.settings.items()))


def test_prefix_lookups_find_the_longest_stored_prefix_at_a_snapshot_among_many_entries():
    """The indexed lookup equals its definition (scan every entry of the same settings: the longest
    snapshot position at which the entry's tokens and the prompt agree, leaving one token to feed,
    past ``beyond``) over hundreds of entries sharing prefixes, with merges and evictions."""
    from lfm_mlx.cache import PrefixCache

    rng = np.random.default_rng(0)
    stems = [rng.integers(0, 6, size=int(rng.integers(1, 30))).tolist() for _ in range(12)]
    settings = [dict(max_kv_size=None, keep=4, kv_bits=None), dict(max_kv_size=64, keep=4, kv_bits=None)]

    def sequence() -> list[int]:
        tokens = list(stems[int(rng.integers(len(stems)))])
        while rng.random() < 0.6:
            tokens += rng.integers(0, 6, size=int(rng.integers(1, 12))).tolist()
        return tokens

    def expected(entries: list[StoredState], query: list[int], kind: dict, beyond: int):
        best = None
        for e in entries:
            if e.settings != kind:
                continue
            agree = next((i for i, (a, b) in enumerate(zip(e.tokens, query)) if a != b), min(len(e.tokens), len(query)))
            position = max((p for p in e.snapshots if beyond < p <= agree and p < len(query)), default=0)
            if position and (best is None or position > best[1]):
                best = e.branch(position)
        return best

    store, live = PrefixCache(max_bytes=300 * 100), {}
    hits = 0
    for step in range(1500):
        if rng.random() < 0.4:
            tokens = sequence()
            snaps = sorted({int(p) for p in rng.integers(1, len(tokens) + 1, size=3)} | {len(tokens)})
            entry = StoredState(tokens, snaps, settings[int(rng.integers(2))])
            extended = [k for k, e in live.items()
                        if e.settings == entry.settings and e.tokens == tokens[: len(e.tokens)]]
            store.insert(entry)
            for k in extended:  # merged into the new entry: their snapshots carried over
                live.pop(k)
            live[id(entry)] = entry
            while len(live) > len(store):  # evicted, oldest first (lookups move hits to the end)
                live.pop(next(k for k in live if k not in store._entries))
            assert set(live) == set(store._entries)
        else:
            query, kind, beyond = sequence(), settings[int(rng.integers(2))], int(rng.integers(0, 3))
            found = store.lookup(query, kind, beyond=beyond)
            assert found == expected(list(live.values()), query, kind, beyond)
            hits += found is not None
    assert hits > 100 and len(store) > 150
    store.clear()
    assert len(store) == 0 and store.lookup(stems[0] + [1], settings[0]) is None
