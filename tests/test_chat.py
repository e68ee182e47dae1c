"""ChatSession: prefix reuse across turns, regenerate/edit through snapshots, tools, save/load."""

from __future__ import annotations

import json

import pytest

import lfm_mlx
from conftest import EOS, GREEDY, ban, forcing



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
    with pytest.raises(ValueError, match='role must be "user" or "tool", not \'wizard\''):
        chat.send("hi", role="wizard")
    assert chat.history == []


def test_a_lone_surrogate_is_refused_before_it_enters_the_history(tiny):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok, **GREEDY)
    run(chat.send("Hello", max_tokens=3, logits_processors=[ban(EOS)]))
    before = chat.history
    with pytest.raises(ValueError, match=r"the message holds a lone surrogate '\\ud800' at character 4"):
        chat.send("Bad \ud800 text")
    with pytest.raises(ValueError, match="lone surrogate"):
        chat.send("\udfff", role="tool")
    assert chat.history == before
    out = run(chat.send("Fine now", max_tokens=3, logits_processors=[ban(EOS)]))
    assert len(out) == 3 and out[-1].cached_tokens > 0
    assert [m["content"] for m in chat.history if m["role"] == "user"] == ["Hello", "Fine now"]


SAVED = {"system": "Sys", "tools": None, "messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Hello"}],
         "sampling": {"temperature": 0.0}, "max_kv_size": None, "kv_bits": None}


@pytest.mark.parametrize("change, message", [
    ({"sampling": [0.5]}, "sampling: must be an object, not a list"),
    ({"system": 5}, "system: must be a string, not 5"),
    ({"tools": {"name": "f"}}, "tools: must be a list, not an object"),
    ({"tools": ["get_weather"]}, 'tools[0]: must be an object, not "get_weather"'),
    ({"max_kv_size": "4096"}, 'max_kv_size: must be an integer, not "4096"'),
    ({"max_kv_size": 2}, "max_kv_size (2) must be larger than keep"),
    ({"kv_bits": 3}, "kv_bits: must be 4 or 8, not 3"),
    ({"sampling": {"top_k": 1e9}}, "sampling.top_k: must be an integer, not 1000000000.0"),
    ({"sampling": {"top_k": 70000}}, "sampling.top_k: must be at most 65536 (the vocabulary size), not 70000"),
    ({"sampling": {"temperature": "hot"}}, 'sampling.temperature: must be a number, not "hot"'),
    ({"sampling": {"temperature": float("inf")}}, "sampling.temperature: must be a finite number, not Infinity"),
    ({"sampling": {"temperature": 6}}, "sampling.temperature: must be less than or equal to 5, not 6"),
    ({"sampling": {"top_p": 0}}, "sampling.top_p: must be greater than 0, not 0"),
    ({"sampling": {"min_p": 1.5}}, "sampling.min_p: must be less than or equal to 1, not 1.5"),
    ({"sampling": {"repetition_penalty": 0}}, "sampling.repetition_penalty: must be greater than 0, not 0"),
    ({"sampling": {"repetition_context_size": True}}, "sampling.repetition_context_size: must be an integer, not true"),
    ({"sampling": {"temprature": 0.5}}, "sampling.temprature: unknown setting (known: temperature, top_p, top_k"),
    ({"messages": [{"role": "user", "content": "Hi", "name": "bo"}]}, "messages[0].name: unknown field"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role: must be 'system', 'user', 'assistant' or"),
    ({"messages": [{"role": "user", "content": ["Hi"]}]}, "messages[0].content: must be a string, not a list"),
    ({"messages": [{"role": "user", "content": "Hi \ud800"}]}, "messages[0].content: holds a lone surrogate"),
    ({"messages": {"role": "user"}}, "messages: must be a list, not an object"),
    ({"messages": None}, "messages: must be a list, not null"),
])
def test_load_names_the_bad_field_of_a_saved_chat_in_one_line(tiny, tmp_path, change, message):
    model, tok = tiny
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({**SAVED, **change}), encoding="utf-8")
    with pytest.raises(ValueError) as error:
        lfm_mlx.ChatSession.load(path, model, tok)
    assert str(error.value).startswith(f"chat.json: {message}") and "\n" not in str(error.value)


@pytest.mark.parametrize("content, message", [
    (b"[]", "chat.json: must be an object, not a list"),
    (b"{", "chat.json: not a saved chat session: not valid JSON (Expecting property name enclosed in double quotes"),
    (b'{"messages": ["caf\xe9"]}', "chat.json: not a saved chat session: not UTF-8 text (byte offset 18)"),
    (b"{}", "chat.json: messages: is missing"),
    (b" " * (20 * 2**20 + 1), "chat.json: over 20 MB, too big for a saved chat session"),
])
def test_load_refuses_a_file_that_is_not_a_small_utf8_json_chat(tiny, tmp_path, content, message):
    model, tok = tiny
    path = tmp_path / "chat.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        lfm_mlx.ChatSession.load(path, model, tok)
    assert str(error.value).startswith(message)
    with pytest.raises(ValueError, match="cannot read .*absent.json: No such file"):
        lfm_mlx.ChatSession.load(tmp_path / "absent.json", model, tok)


def test_save_and_load_round_trip_tools_tool_calls_and_cache_settings(tiny, tmp_path):
    model, tok = tiny
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    sampling = dict(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
                    repetition_context_size=32, max_tokens=20, seed=3)
    chat = lfm_mlx.ChatSession(model, tok, system="Sys", tools=tools, max_kv_size=256, kv_bits=8, **sampling)
    chat.messages = [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "<|tool_call_start|>...<|tool_call_end|>", "tool_calls": [
                         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "content": '{"temp_c": 21}'}]
    path = tmp_path / "chat.json"
    chat.save(path)
    loaded = lfm_mlx.ChatSession.load(path, model, tok)
    assert loaded.history == chat.history and loaded.tools == tools and loaded.sampling == sampling
    assert loaded.cache.settings == chat.cache.settings


def test_save_refuses_a_session_load_would_refuse_and_writes_nothing(tiny, tmp_path):
    model, tok = tiny
    chat = lfm_mlx.ChatSession(model, tok, logits_processors=[ban(EOS)])
    path = tmp_path / "chat.json"
    with pytest.raises(ValueError, match="cannot save this session: sampling.logits_processors: unknown setting"):
        chat.save(path)
    assert list(tmp_path.iterdir()) == []
