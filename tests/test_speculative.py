"""Speculative prompt-lookup decoding emits exactly the greedy tokens."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import lfm_mlx
from conftest import GREEDY, relative_error
from lfm_mlx.cache import KVCache, PromptCache
from lfm_mlx.generate import NgramIndex, SpeculativeStats, prefill, prompt_lookup_tokens


def extraction_like_prompts(n: int = 3) -> list:
    """Documents with repeated spans, then the start of a span again: drafts that are sometimes right."""
    rng = np.random.default_rng(7)
    prompts = []
    for _ in range(n):
        doc = rng.integers(100, 60000, size=60).tolist()
        prompts.append(doc + doc[10:30] + [5, 6] + doc[:8] + doc[40:44])
    return prompts


@pytest.mark.parametrize("which", ["float", "4-bit"])
def test_prompt_lookup_emits_exactly_the_greedy_tokens(which, tiny, tiny_4bit):
    model = tiny[0] if which == "float" else tiny_4bit
    tok = tiny[1]
    stats = SpeculativeStats()
    for prompt in extraction_like_prompts():
        plain = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_tokens=32, **GREEDY)]
        spec = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_tokens=32, speculative=True,
                                                         draft_tokens=4, **GREEDY)]
        assert spec == plain
        cache = PromptCache(model)
        prefill(model, cache, prompt[:-1])
        assert list(prompt_lookup_tokens(model, cache, prompt[-1], 32, stats=stats)) == plain
    # Both outcomes were exercised: drafts kept and drafts thrown away (conv and KV rewound).
    assert 0 < stats.accepted < stats.drafted


def test_prompt_lookup_from_a_reference_is_exact_whether_or_not_the_reference_is_right(tiny):
    model, tok = tiny
    prompt = np.random.default_rng(3).integers(100, 60000, size=40).tolist()
    plain = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_tokens=40, **GREEDY)]
    wrong = np.random.default_rng(4).integers(100, 60000, size=40).tolist()
    acceptance = []
    for reference in (plain, plain[:2] + wrong):
        cache, stats = PromptCache(model), SpeculativeStats()
        prefill(model, cache, prompt[:-1])
        out = list(prompt_lookup_tokens(model, cache, prompt[-1], 40, stats=stats, reference=reference))
        assert out == plain and stats.drafted > 0
        acceptance.append(stats.acceptance)
    assert acceptance[0] >= 0.5 and acceptance[1] < 1.0  # the wrong reference's drafts were rewound


def test_prompt_lookup_leaves_the_cache_as_plain_decoding_does(tiny):
    model, tok = tiny
    prompt = extraction_like_prompts(1)[0]
    caches = [PromptCache(model), PromptCache(model)]
    outs = [list(lfm_mlx.stream_generate(model, tok, prompt, max_tokens=30, prompt_cache=c, speculative=s, **GREEDY))
            for c, s in zip(caches, (False, True))]
    assert [r.token for r in outs[0]] == [r.token for r in outs[1]]
    assert caches[0].tokens == caches[1].tokens
    assert [c.offset for c in caches[0].layers] == [c.offset for c in caches[1].layers]
    nxt = mx.array([[outs[0][-1].token]])
    a, b = (model(nxt, cache=c.layers) for c in caches)
    assert relative_error(b, a) < 1e-5


@pytest.mark.parametrize("opts", [dict(max_kv_size=64), dict(kv_bits=8)])
def test_prompt_lookup_is_exact_with_a_rolling_or_quantized_kv_cache(tiny, opts):
    model, tok = tiny
    prompt = extraction_like_prompts(1)[0][:50]
    plain = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_tokens=60, **opts, **GREEDY)]
    cache = PromptCache(model, **opts)
    spec = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_tokens=60, prompt_cache=cache,
                                                     speculative="prompt_lookup", **opts, **GREEDY)]
    assert spec == plain
    if "max_kv_size" in opts:
        assert all(c.evictions > 0 for c in cache.layers if isinstance(c, KVCache))


def test_speculative_decoding_refuses_sampling_and_logits_processors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="greedy"):
        list(lfm_mlx.stream_generate(model, tok, "Hi", max_tokens=2, speculative=True, temperature=0.7))
    with pytest.raises(ValueError, match="greedy"):
        list(lfm_mlx.stream_generate(model, tok, "Hi", max_tokens=2, speculative=True, temperature=0.0,
                                     logits_processors=[lambda h, l: l]))
    with pytest.raises(ValueError, match="prompt_lookup"):
        list(lfm_mlx.stream_generate(model, tok, "Hi", max_tokens=2, speculative="draft_model", **GREEDY))


def test_ngram_index_drafts_what_followed_the_latest_earlier_occurrence():
    index = NgramIndex([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3], max_n=3, min_n=2)
    assert index.draft(3) == [5, 6, 7]  # "2 3" last seen before 5 6 7; "7 2 3" never
    index.append(8)
    assert index.draft(3) == []  # "3 8" never seen; a lone "8" is not enough
    assert NgramIndex([4, 4, 4], max_n=2, min_n=2).draft(5) == [4]
    assert NgramIndex([1, 4, 2, 4], max_n=2, min_n=1).draft(2) == [2, 4]
