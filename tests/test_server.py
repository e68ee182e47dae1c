"""The OpenAI-compatible server, driven live with the official ``openai`` client."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import jsonschema
import openai
import pytest
import uvicorn

from lfm_mlx.api import Limits
from lfm_mlx.engine import Engine
from lfm_mlx.server import Server, create_app

CONTEXT = 1024
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model, tok, **options):
    """Our server on a free loopback port, in this process, with its engine on its own thread."""
    engine = Engine(model, tok, max_batch=options.pop("max_batch", 16), prefix_cache_bytes=64 << 20)
    if options.pop("start", True):
        engine.start()
    server = Server(engine, "tiny", limits=Limits(context=CONTEXT, max_tokens=options.pop("max_tokens", 64)),
                    **options)
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=free_port(), log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}", server
    finally:
        http.should_exit = True
        thread.join(10)
        engine.stop()


@pytest.fixture(scope="module")
def live(tiny):
    model, tok = tiny
    with serving(model, tok) as (url, server):
        yield url, server


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content="Hello there", **kwargs):
    options = dict(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0)
    return client.chat.completions.create(**{**options, **kwargs})


def test_streaming_and_non_streaming_chat_agree_at_temperature_zero(client):
    whole = chat(client, "Tell me about the sea")
    pieces = list(chat(client, "Tell me about the sea", stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert whole.choices[0].message.content == streamed and streamed
    assert whole.choices[0].finish_reason == [c for c in pieces if c.choices][-1].choices[0].finish_reason
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens > 0 and whole.model == "tiny" and whole.object == "chat.completion"


def test_completions_stream_and_not(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert whole.choices[0].text == streamed and whole.usage.completion_tokens >= 1
    assert whole.choices[0].finish_reason in ("stop", "length")


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                                      "ok": {"type": "boolean"}}, "required": ["tags", "ok"]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"},
                                      "total": {"type": "number"}}, "required": ["when", "total"]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_replies_validate_even_when_sampling(client, schema):
    for seed in range(3):
        r = chat(client, "Give me the data.", temperature=0.9, seed=seed, max_tokens=64,
                 response_format={"type": "json_schema", "json_schema": {"name": "data", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_reply_parses(client):
    r = chat(client, "JSON please", temperature=0.7, seed=1, max_tokens=48, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_named_tool_choice_returns_a_valid_call_and_the_result_round_trips(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=48,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       temperature=0.8, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    follow = messages + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    answer = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens


def test_required_tool_choice_is_enforced_and_streams_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], tool_choice="required",
        max_tokens=48, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "<|tool_call_start|>" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_seeds_reproduce_and_differ(client):
    a, b, c = (chat(client, "Write", temperature=1.0, seed=s, max_tokens=16).choices[0].message.content
               for s in (5, 5, 6))
    assert a == b and a != c


def test_follow_up_turn_reports_cached_tokens(client):
    first_messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi, who are you?"}]
    first = client.chat.completions.create(model="tiny", messages=first_messages, max_tokens=8, temperature=0)
    follow = first_messages + [{"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny", messages=follow, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_logprobs_come_with_each_token(client):
    r = chat(client, "Hello", logprobs=True, top_logprobs=2, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)


def test_models_and_health(live):
    url, _ = live
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/health").json()["status"] == "ok"


BAD_REQUESTS = [
    (b"{not json", 400, "invalid_json"),
    ({"model": "tiny"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_p": 2.0}, 400, "min_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 100000}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "word " * 200_000}]}, 400, "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, 400, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "required": ["name", "email"], "properties": {
            "name": {"type": "string"}, "email": {"type": "string"}}}}}},
     400, '"param": "max_tokens", "code": "invalid_value"'),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "not a name", "parameters": {"type": "object"}}}]}, 400, "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400, "arguments"),
]


@pytest.mark.parametrize("body,status,mentions", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(live, client, body, status, mentions):
    url, _ = live
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert mentions in json.dumps(error)
    assert chat(client, "still there?", max_tokens=2).choices[0].message is not None


def test_oversized_body_is_refused_with_413(live):
    r = httpx.post(live[0] + "/v1/chat/completions", content=b"x" * (5 << 20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_disconnected_stream_frees_its_row(live):
    url, server = live
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": 64,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        assert wait_until(lambda: server.engine.occupancy[0] == 1, 5)
    assert wait_until(lambda: server.engine.occupancy == (0, 0), 5)


def test_hostile_requests_never_hold_the_server_from_other_clients(live, client):
    url, server = live
    start = time.monotonic()
    flood = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * (1 << 20)}]})
    assert flood.status_code == 400 and time.monotonic() - start < 2  # refused without tokenizing a megabyte
    endless = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 10**12, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=endless) as r:
        assert r.status_code == 200 and next(r.iter_lines()).startswith("data:")
        start = time.monotonic()  # while it runs, another client is served beside it
        assert chat(client, "hi", max_tokens=8, temperature=0.7).choices[0].finish_reason in ("stop", "length")
        assert time.monotonic() - start < 10
    assert wait_until(lambda: server.engine.occupancy == (0, 0), 5)  # the endless row left with its client


def test_sixteen_concurrent_streams_each_get_their_own_reply(live, client):
    prompts = [f"Story number {i}: about {w}" for i, w in enumerate("abcdefghijklmnop")]
    alone = {p: chat(client, p, max_tokens=10).choices[0].message.content for p in prompts}
    results: dict[str, str] = {}

    def stream(p):
        c = openai.OpenAI(base_url=live[0] + "/v1", api_key="x", max_retries=0, timeout=120)
        results[p] = "".join(ch.choices[0].delta.content or "" for ch in chat(c, p, max_tokens=10, stream=True)
                             if ch.choices)

    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    assert len(set(results.values())) > 1


def test_a_full_queue_answers_429_with_retry_after(tiny):
    model, tok = tiny
    # An engine that never steps: whatever is submitted stays waiting, so the queue fills for sure.
    with serving(model, tok, max_queue=1, start=False) as (url, server):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200 and next(first.iter_lines()).startswith("data:")
            assert server.engine.occupancy == (0, 1)
            second = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False})
            assert second.status_code == 429 and second.headers["retry-after"].isdigit()
            assert second.json()["error"]["type"] == "rate_limit_error"


def test_api_key_guards_every_v1_route_but_not_health(tiny):
    model, tok = tiny
    with serving(model, tok, api_key="sesame") as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert chat(good, "hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            chat(openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0), "hi")


def test_api_key_errors_are_openai_errors_on_every_v1_route(tiny):
    model, tok = tiny
    with serving(model, tok, api_key="sesame") as (url, _):
        for method, path in [("GET", "/v1/models/tiny"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
            r = httpx.request(method, url + path, json={"prompt": "hi"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path


def test_a_serving_process_settles_blas_threads_and_the_collector():
    """In a process of its own: one BLAS thread where OpenBLAS is loaded (CI preloads it), none to set
    where it is not; the objects loaded so far frozen out of full collections."""
    code = ("import ctypes, gc; from lfm_mlx.process import one_blas_thread, settle_for_serving\n"
            "try:\n    get = ctypes.CDLL(None).openblas_get_num_threads\nexcept AttributeError:\n    get = None\n"
            "settle_for_serving()\n"
            "print(get() if get else 'none', one_blas_thread(), gc.get_freeze_count() > 1000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out in (["1", "True", "True"], ["none", "False", "True"]), out


def test_the_command_line_serves_on_loopback(tiny_checkpoint, tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lfm_mlx.server", "--model", str(tiny_checkpoint),
                                "--port", str(port), "--max-batch", "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _answers(url), 120), process.stdout.read() if process.poll() is not None else ""
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert c.models.list().data[0].id == str(tiny_checkpoint)
        assert chat(c, "hi", model=str(tiny_checkpoint), max_tokens=3).usage.completion_tokens >= 1
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        process.terminate()
        # uvicorn shuts down, then re-raises SIGTERM: -15, not an abort (-6) or a traceback.
        assert process.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stdout.read()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
