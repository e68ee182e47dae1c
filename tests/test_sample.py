"""Sampling: every setting checked by name, mlx-lm's filters, draws that depend only on their own key, and
the checkpoint's defaults read leniently."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_repetition_penalty

from lfm_mlx import cpu_kernel
from lfm_mlx.sample import (
    LIQUID_DEFAULTS, SamplingSettings, filter_logprobs, new_key, read_generation_config, repeat_penalty, sample,
    split_keys)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, r"temperature must be in \[0, 5\], not -0.1"),
    ("temperature", float("nan"), "temperature must be in"),
    ("temperature", "hot", "temperature must be a number, not str 'hot'"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\], not 0.0"),
    ("min_p", 2.0, r"min_p must be in \[0, 1\], not 2.0"),
    ("top_k", 2.5, "top_k must be an integer, not float 2.5"),
    ("top_k", True, "top_k must be an integer, not bool True"),
    ("repetition_penalty", 0, r"repetition_penalty must be in \(0, 10\]"),
    ("presence_penalty", 3, r"presence_penalty must be in \[-2, 2\]"),
])
def test_every_bad_setting_is_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{field: value})


def test_updates_skip_none_refuse_unknown_names_and_integral_floats_are_integers():
    s = SamplingSettings().updated(temperature=0.7, top_k=40.0, top_p=None)
    assert (s.temperature, s.top_k, s.top_p) == (0.7, 40, LIQUID_DEFAULTS["top_p"]) and isinstance(s.top_k, int)
    with pytest.raises(ValueError, match="unknown sampling setting.*warmth"):
        s.updated(warmth=1)
    with pytest.raises(ValueError, match="top_k must be at most 100 .* 0 turns it off"):
        SamplingSettings(top_k=101).check_vocabulary(100)
    assert SamplingSettings(temperature=0).greedy and not s.greedy


def test_filters_equal_mlx_lms():
    logprobs = mx.log(mx.softmax(mx.random.normal((3, 500), key=mx.random.key(0)), axis=-1))
    for top_p, min_p, top_k in [(0.9, 0.0, 0), (1.0, 0.05, 0), (1.0, 0.0, 20), (0.8, 0.02, 50)]:
        expected = logprobs
        if top_p < 1:
            expected = apply_top_p(expected, top_p)
        if min_p > 0:
            expected = apply_min_p(expected, min_p)
        if top_k > 0:
            expected = apply_top_k(expected, top_k)
        ours = filter_logprobs(logprobs, SamplingSettings(top_p=top_p, min_p=min_p, top_k=top_k))
        assert np.array_equal(np.isfinite(np.array(ours)), np.isfinite(np.array(expected))), (top_p, min_p, top_k)


def test_the_repetition_penalty_of_many_rows_equals_mlx_lms_row_by_row():
    logits = mx.random.normal((4, 300), key=mx.random.key(1)) * 3
    recent = [[5, 9, 5, 200, 9], [7], [], [299, 0, 12, 12, 12, 40, 41]]  # repeats, one token, none
    penalties = [1.5, 0.7, 2.0, 1.05]
    ours = repeat_penalty(logits, recent, penalties)
    for i, (tokens, penalty) in enumerate(zip(recent, penalties)):
        expected = make_repetition_penalty(penalty, 64)(mx.array(tokens, mx.int32), logits[i : i + 1])
        assert np.array_equal(np.array(ours[i : i + 1]), np.array(expected)), i
    assert repeat_penalty(logits, [[], []], [1.5, 1.5]) is logits


def test_a_row_draws_from_its_own_key_whatever_rows_are_beside_it():
    logits = mx.random.normal((4, 1000), key=mx.random.key(1))
    s = SamplingSettings(temperature=1.0, top_k=0)
    keys = mx.stack([new_key(seed) for seed in range(4)])
    together = sample(logits, s, keys).tolist()
    alone = [sample(logits[i : i + 1], s, keys[i : i + 1]).item() for i in range(4)]
    assert together == alone
    # The noise of each row is the one its key draws alone, as MLX's own Gumbel sampler draws it.
    for i in range(4):
        noise = mx.random.gumbel((1, 1000), key=keys[i])
        assert alone[i] == mx.argmax(logits[i : i + 1] + noise, axis=-1).item()
    assert sample(logits, SamplingSettings(temperature=0), None).tolist() == mx.argmax(logits, axis=-1).tolist()


def test_draws_follow_the_tempered_distribution():
    logits = mx.array([[2.0, 1.0, 0.0, -9.0]])
    s = SamplingSettings(temperature=0.5, top_k=0)
    keys, counts = new_key(7)[None], np.zeros(4)
    for _ in range(3000):
        keys, draws = split_keys(keys)
        counts[sample(logits, s, draws).item()] += 1
    expected = np.exp(np.array([2.0, 1.0, 0.0, -9.0]) / 0.5)
    expected /= expected.sum()
    assert np.abs(counts / counts.sum() - expected).max() < 0.03 and counts[3] == 0


def test_top_k_draws_only_the_k_best_in_their_tempered_proportions():
    """With top-k and no top-p, the noise is drawn for the k best alone: the same distribution, and a
    row's draw still depends only on its own key."""
    logits = mx.array([[0.5, 2.0, -1.0, 1.0, 1.5, -9.0]])
    s = SamplingSettings(temperature=0.7, top_k=3, min_p=0.5)  # min-p then drops 1.0 (p < 0.5 p_max)
    keys, counts = new_key(8)[None], np.zeros(6)
    for _ in range(3000):
        keys, draws = split_keys(keys)
        counts[sample(logits, s, draws).item()] += 1
    expected = np.zeros(6)
    expected[[1, 4]] = np.exp(np.array([2.0, 1.5]) / 0.7)
    assert np.abs(counts / counts.sum() - expected / expected.sum()).max() < 0.03
    wide = mx.random.normal((4, 5000), key=mx.random.key(2))
    keys = mx.stack([new_key(seed) for seed in range(4)])
    s = SamplingSettings(temperature=1.0, top_k=50)
    assert sample(wide, s, keys).tolist() == [sample(wide[i : i + 1], s, keys[i : i + 1]).item() for i in range(4)]


def test_keys_split_together_as_each_alone():
    keys = mx.stack([new_key(seed) for seed in (3, 5, 2**40 + 1)])
    keep, draws = split_keys(keys)
    for i in range(3):
        alone = mx.random.split(keys[i])
        assert np.array_equal(np.array(keep[i]), np.array(alone[0]))
        assert np.array_equal(np.array(draws[i]), np.array(alone[1]))


def test_the_cpu_top_k_is_mlxs_argpartition_with_ties_and_nan():
    ext = cpu_kernel.extension()
    if ext is None:
        pytest.skip("the CPU extension is not built here; sampling uses mx.argpartition")
    x = mx.random.normal((5, 3000), key=mx.random.key(3))
    for k in (1, 50, 3000):
        ours = np.sort(np.array(ext.top_k(x, k, stream=mx.cpu)), axis=-1)
        theirs = np.sort(np.array(mx.argpartition(-x, kth=k - 1, axis=-1)[:, :k]), axis=-1)
        assert np.array_equal(ours, theirs)
    ties = mx.array([[1.0, 3.0, 3.0, float("nan"), 3.0, 0.0]])
    assert ext.top_k(ties, 2, stream=mx.cpu).tolist() == [[1, 2]]  # the first of equal values
    assert ext.top_k(ties, 6, stream=mx.cpu).tolist() == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="1 <= k"):
        ext.top_k(ties, 7, stream=mx.cpu)


def test_generation_config_gives_the_defaults_it_can(tmp_path):
    def read(content) -> SamplingSettings:
        (tmp_path / "generation_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
        return read_generation_config(tmp_path)

    assert read({"temperature": 0.3, "top_k": 20, "top_p": 0.9}) == SamplingSettings(temperature=0.3, top_k=20,
                                                                                    top_p=0.9)
    assert read({"temperature": "hot", "min_p": 0.1}) == SamplingSettings(min_p=0.1)  # the bad one keeps its default
    assert read({"do_sample": False, "temperature": 0.9}).greedy
    assert read("[1, 2]") == read("{not json") == SamplingSettings()
    assert read_generation_config(tmp_path / "missing") == SamplingSettings()
    assert math.isclose(SamplingSettings().temperature, LIQUID_DEFAULTS["temperature"])
