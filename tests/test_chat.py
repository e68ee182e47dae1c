"""ChatSession: prefix reuse across turns, regenerate/edit through snapshots, tools, save/load."""

from __future__ import annotations

import json

import pytest

import lfm_mlx
from conftest import ban, forcing

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
EOS = 7


def run(stream):
    return list(stream)


def test_second_turn_reuses_the_whole_first_exchange(tiny):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok, system="Be brief.", **GREEDY)
    first = run(chat.send("What is MLX?", max_tokens=12, logits_processors=[forcing([300, 301, 302, EOS])]))
    assert first[-1].finish_reason == "stop"
    first_exchange = first[-1].prompt_tokens + len(first)  # prompt + reply tokens, <|im_end|> included
    second = run(chat.send("And what is LFM2?", max_tokens=4))
    assert second[-1].cached_tokens == first_exchange
    assert second[-1].prompt_tokens > first_exchange


def test_regenerate_reuses_everything_but_the_last_prompt_token(tiny):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok, **GREEDY)
    run(chat.send("Hello", max_tokens=6, logits_processors=[ban(EOS)]))
    second = run(chat.send("Tell me more", max_tokens=6, logits_processors=[ban(EOS)]))
    prompt_tokens = second[-1].prompt_tokens
    again = run(chat.regenerate(max_tokens=6, logits_processors=[ban(EOS)]))
    assert again[-1].prompt_tokens == prompt_tokens
    assert again[-1].cached_tokens == prompt_tokens - 1
    assert [r.token for r in again] == [r.token for r in second]
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]


def test_edit_last_reuses_everything_before_the_last_user_turn(tiny):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok, **GREEDY)
    run(chat.send("Hello", max_tokens=5, logits_processors=[forcing([300, EOS])]))
    before_last_turn = chat.context_tokens
    run(chat.send("Original question", max_tokens=5, logits_processors=[ban(EOS)]))
    edited = run(chat.edit_last("Edited question", max_tokens=5, logits_processors=[ban(EOS)]))
    assert edited[-1].cached_tokens >= before_last_turn
    assert chat.history[-2] == {"role": "user", "content": "Edited question"}
    fresh = lfm_mlx.ChatSession(model, tok, **GREEDY)
    run(fresh.send("Hello", max_tokens=5, logits_processors=[forcing([300, EOS])]))
    again = run(fresh.send("Edited question", max_tokens=5, logits_processors=[ban(EOS)]))
    assert [r.token for r in edited] == [r.token for r in again]


def test_ten_turn_chat_prefills_only_new_tokens(tiny):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok, **GREEDY)
    cached = prefilled = 0
    for turn in range(10):
        out = run(chat.send(f"Turn {turn}: say something", max_tokens=8, logits_processors=[ban(EOS)]))
        cached += out[-1].cached_tokens
        prefilled += out[-1].prompt_tokens - out[-1].cached_tokens
    print(f"10-turn chat: {cached} prompt tokens reused, {prefilled} prefilled")
    assert prefilled < 0.15 * (cached + prefilled)


def test_stopping_a_reply_keeps_the_partial_text_in_history(tiny):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok, **GREEDY)
    stream = chat.send("Go on", max_tokens=100, logits_processors=[ban(EOS)])
    got = "".join(next(stream).text for _ in range(3))
    stream.close()
    assert chat.history[-1] == {"role": "assistant", "content": got}


def test_tool_calls_land_in_history_and_tool_results_feed_back(tiny):
    model, tok = tiny
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    chat = lfm_mlx.ChatSession(model, tok, tools=tools, **GREEDY)
    call = '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
    out = run(chat.send("Weather?", max_tokens=40,
                        logits_processors=[forcing(tok.encode(call, add_special_tokens=False) + [EOS])]))
    assert out[-1].tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert chat.history[-1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    result = run(chat.send('{"temp_c": 21}', role="tool", max_tokens=3, logits_processors=[ban(EOS)]))
    assert result[-1].cached_tokens == out[-1].prompt_tokens + len(out)
    assert chat.history[-2] == {"role": "tool", "content": '{"temp_c": 21}'}


def test_save_and_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok, system="Sys", **GREEDY)
    run(chat.send("Hi", max_tokens=4, logits_processors=[ban(EOS)]))
    path = tmp_path / "chat.json"
    chat.save(path)
    loaded = lfm_mlx.ChatSession.load(path, model, tok)
    assert loaded.history == chat.history and loaded.sampling == chat.sampling
    a = run(chat.send("Next", max_tokens=4, logits_processors=[ban(EOS)]))
    b = run(loaded.send("Next", max_tokens=4, logits_processors=[ban(EOS)]))
    assert [r.token for r in a] == [r.token for r in b]


def test_bad_input_is_refused_clearly(tiny, tmp_path):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok)
    with pytest.raises(ValueError, match="empty"):
        chat.send("   ")
    with pytest.raises(ValueError, match="nothing to regenerate"):
        chat.regenerate()
    with pytest.raises(ValueError, match="no user message"):
        chat.edit_last("x")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": 3}]}))
    with pytest.raises(ValueError, match="messages must be"):
        lfm_mlx.ChatSession.load(bad, model, tok)
    bad.write_text("{")
    with pytest.raises(ValueError, match="not a saved chat session"):
        lfm_mlx.ChatSession.load(bad, model, tok)
