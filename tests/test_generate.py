"""The token loop: cached decoding, sampling, stop strings, streaming text, tool-call marks, batches."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import lfm_mlx
from conftest import EOS, GREEDY, ban, forcing
from lfm_mlx.generate import StopMatcher



def uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Recompute the whole sequence every step: no cache at all."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(mx.array([ids]))
        logits[..., EOS] = -mx.inf
        ids.append(int(mx.argmax(logits[0, -1]).item()))
    return ids[len(prompt):]


def test_greedy_cached_stream_equals_uncached_recomputation(tiny):
    model, tok = tiny
    prompt = tok.encode("The quick brown fox")
    stream = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_tokens=24,
                                                       logits_processors=[ban(EOS)], **GREEDY)]
    assert stream == uncached_greedy(model, prompt, 24)


def test_chunked_prefill_equals_single_pass(tiny):
    model, tok = tiny
    prompt = list(np.random.default_rng(0).integers(100, 60000, size=300))
    one = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_tokens=16, prefill_step_size=4096,
                                                    logits_processors=[ban(EOS)], **GREEDY)]
    chunked = [r.token for r in lfm_mlx.stream_generate(model, tok, prompt, max_tokens=16, prefill_step_size=37,
                                                        logits_processors=[ban(EOS)], **GREEDY)]
    assert one == chunked


def test_response_fields_and_finish_reasons(tiny):
    model, tok = tiny
    responses = list(lfm_mlx.stream_generate(model, tok, "Hello", max_tokens=5, logits_processors=[ban(EOS)], **GREEDY))
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]
    last = responses[-1]
    assert last.prompt_tokens == len(tok.encode("Hello")) and last.cached_tokens == 0
    assert last.generation_tokens == 5 and last.ttft_s > 0 and last.prompt_tps > 0 and last.peak_memory_mb > 0
    stopped = list(lfm_mlx.stream_generate(model, tok, "Hello", max_tokens=50, logits_processors=[forcing([300, 301, EOS])], **GREEDY))
    assert [r.token for r in stopped] == [300, 301, EOS] and stopped[-1].finish_reason == "stop"


def test_prompt_forms_string_ids_and_messages_agree(tiny):
    model, tok = tiny
    messages = [{"role": "user", "content": "Hi there"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    outs = [lfm_mlx.generate(model, tok, p, max_tokens=8, logits_processors=[ban(EOS)], **GREEDY)
            for p in (messages, ids)]
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="empty"):
        list(lfm_mlx.stream_generate(model, tok, [], max_tokens=2))


def test_stop_string_split_across_tokens_is_never_shown(tiny):
    model, tok = tiny
    script = tok.encode("alpha beta gamma delta epsilon", add_special_tokens=False)
    assert len(script) >= 4
    stop = "ma del"  # spans the tokens of "gamma" and " delta"
    responses = list(lfm_mlx.stream_generate(model, tok, "x", max_tokens=40, stop=[stop],
                                             logits_processors=[forcing(script)], **GREEDY))
    text = "".join(r.text for r in responses)
    assert text == "alpha beta gam"
    assert responses[-1].finish_reason == "stop"
    shown = ""
    for r in responses:
        shown += r.text
        assert stop not in shown


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["</end>", "STOP"])
    assert m.feed("hello </e") == ("hello ", False)
    assert m.feed("nd") == ("", False)
    assert m.feed("> more") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ay calm") == ("STay calm", False)
    assert m.flush() == ""


def test_seed_makes_sampling_reproducible(tiny):
    model, tok = tiny
    opts = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                logits_processors=[ban(EOS)])
    a = [r.token for r in lfm_mlx.stream_generate(model, tok, "Once upon", seed=7, **opts)]
    b = [r.token for r in lfm_mlx.stream_generate(model, tok, "Once upon", seed=7, **opts)]
    c = [r.token for r in lfm_mlx.stream_generate(model, tok, "Once upon", seed=8, **opts)]
    assert a == b and a != c


def test_checkpoint_defaults_are_passed_explicitly_and_arguments_override_them(tiny, tmp_path):
    """A checkpoint's generation config reaches generation only when passed as ``defaults``."""
    model, tok = tiny
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "repetition_penalty": 1.0}')
    defaults = lfm_mlx.read_generation_config(tmp_path)
    opts = dict(max_tokens=16, logits_processors=[ban(EOS)])
    greedy = [r.token for r in lfm_mlx.stream_generate(model, tok, "Once upon", **GREEDY, **opts)]
    assert [r.token for r in lfm_mlx.stream_generate(model, tok, "Once upon", defaults=defaults, **opts)] == greedy
    sampled = [r.token for r in lfm_mlx.stream_generate(model, tok, "Once upon", defaults=defaults, temperature=1.0,
                                                        top_k=0, seed=3, **opts)]
    assert sampled != greedy and not hasattr(model, "sampling_defaults")


def test_multibyte_text_streams_without_split_characters(tiny):
    model, tok = tiny
    text = "日本語のテキスト 🙂🚀 Ελληνικά naïve café"
    script = tok.encode(text, add_special_tokens=False)
    responses = list(lfm_mlx.stream_generate(model, tok, "x", max_tokens=len(script) + 1,
                                             logits_processors=[forcing(script)], **GREEDY))
    assert "".join(r.text for r in responses) == text
    assert all("\ufffd" not in r.text for r in responses)


def test_tool_call_spans_are_marked_and_parsed(tiny):
    model, tok = tiny
    reply = 'Checking. <|tool_call_start|>[get_weather(city="Paris"), search(q="x", limit=3)]<|tool_call_end|>'
    responses = list(lfm_mlx.stream_generate(model, tok, "x", max_tokens=80,
                                             logits_processors=[forcing(tok.encode(reply, add_special_tokens=False))],
                                             **GREEDY))
    assert "".join(r.text for r in responses) == reply
    marked = "".join(r.text for r in responses if r.in_tool_call)
    assert marked.startswith("<|tool_call_start|>") and marked.endswith("<|tool_call_end|>")
    assert "Checking" not in marked
    assert responses[-1].tool_calls == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "search", "arguments": {"q": "x", "limit": 3}},
    ]


def test_closing_the_stream_stops_generation_and_leaves_a_consistent_cache(tiny):
    model, tok = tiny
    cache = lfm_mlx.PromptCache(model)
    prompt = tok.encode("Stop me")
    stream = lfm_mlx.stream_generate(model, tok, prompt, max_tokens=1000, prompt_cache=cache,
                                     logits_processors=[ban(EOS)], **GREEDY)
    seen = [next(stream).token for _ in range(3)]
    stream.close()
    # What the cache holds is exactly the prompt and the tokens fed so far (a continuation may reuse it).
    assert cache.tokens[: len(prompt)] == prompt
    assert cache.tokens[len(prompt):] == seen[: len(cache.tokens) - len(prompt)]
    assert len(cache.tokens) <= len(prompt) + 3
    kv = [c for c in cache.layers if hasattr(c, "keys")][0]
    assert kv.offset == len(cache.tokens)


def test_mixed_length_batch_equals_each_prompt_alone(tiny):
    model, tok = tiny
    prompts = ["Hi", "A much longer prompt that talks about many different things at once", "Mid-size prompt here"]
    opts = dict(max_tokens=12, row_logits_processors=[[ban(EOS)] for _ in prompts], **GREEDY)
    batch = lfm_mlx.batch_generate(model, tok, prompts, **opts)
    alone = [lfm_mlx.generate(model, tok, p, max_tokens=12, logits_processors=[ban(EOS)], **GREEDY) for p in prompts]
    assert batch == alone
    assert len(set(batch)) > 1


def test_batch_rows_stop_independently(tiny):
    model, tok = tiny
    out = lfm_mlx.batch_generate(model, tok, ["a", "b"], max_tokens=10, **GREEDY,
                                 row_logits_processors=[[forcing([300, EOS])], [forcing([301, 302, 303, EOS])]])
    assert out == [tok.decode([300]), tok.decode([301, 302, 303])]


@pytest.fixture(scope="module")
def lfm25_tokenizer_dir(tmp_path_factory):
    """The LFM2.5 tokenizer with Liquid's LFM2.5 chat template (tool calls, thinking)."""
    import shutil

    from conftest import LFM25_TOKENIZER, SHARED, TOKENIZER_FILES, require_shared

    require_shared()
    d = tmp_path_factory.mktemp("lfm25-tok")
    for name in TOKENIZER_FILES:
        if (LFM25_TOKENIZER / name).is_file():
            shutil.copy(LFM25_TOKENIZER / name, d / name)
    shutil.copy(SHARED / "LFM2.5-chat-templates" / "lfm2_5_chat_template.jinja", d / "chat_template.jinja")
    return d


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("which", ["LFM2-350M", "LFM2.5"])
def test_chat_template_with_tools_equals_transformers(which, lfm25_tokenizer_dir):
    from transformers import AutoTokenizer

    from conftest import LFM2_350M
    from lfm_mlx.generate import encode_prompt
    from lfm_mlx.tokenizer import load_tokenizer

    path = LFM2_350M if which == "LFM2-350M" else lfm25_tokenizer_dir
    ours, theirs = load_tokenizer(path, eos_token_ids=7), AutoTokenizer.from_pretrained(path)
    call = '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
    # LFM2's first template drops `tool_calls`: the calls go into the content, where LFM2.5's puts them.
    written = [{"role": "assistant", "content": call} if m.get("tool_calls") else m for m in TOOL_CONVERSATION]
    for n in (2, 3, 5):
        conversation = TOOL_CONVERSATION if which == "LFM2.5" else written
        expected = theirs.apply_chat_template(conversation[:n], tools=TOOLS, add_generation_prompt=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert encode_prompt(ours, TOOL_CONVERSATION[:n], tools=TOOLS) == list(expected)
    text = ours.decode(encode_prompt(ours, TOOL_CONVERSATION, tools=TOOLS))
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text and "<|im_start|>tool\n" in text
