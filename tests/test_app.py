"""The web app through its API (gradio_client, raw HTTP, the OpenAI routes), against `python -m app --demo`
started once for the session."""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "assets" / "schemas"
MAX_KV = 2048  # small, so a paste longer than the context is quick to send
NORMAL_CHAT_S = 15  # a short chat after a hostile request must finish within this
SCHEMA = json.dumps({"type": "object", "properties": {"company": {"type": "string"},
                                                      "skills": {"type": "array", "items": {"type": "string"}}}})
# ~150,000 characters (~100,000 demo-tokenizer tokens): under the document cap, a dozen chunks of work.
LONG_DOCUMENT = ("Kestrel Analytics is hiring a data engineer in Amsterdam. Skills: Python, Spark. " * 2000)[:150_000]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_APP: dict = {}


def launch_app(tmp_path_factory) -> str:
    """The app on the demo model, on a free port, with its own model cache: started once per test run
    (test_browser.py uses it too) and stopped when Python exits. Its output goes to ``_APP["log"]``."""
    if "url" in _APP:
        return _APP["url"]
    port = free_port()
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "LFM_MLX_CACHE": str(cache), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--demo", "--port", str(port), "--max-kv-size", str(MAX_KV)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    atexit.register(proc.kill)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start:\n{log.read_text()}")
            time.sleep(0.3)
    _APP.update(url=url, proc=proc, log=log, cache=cache)
    return url


@pytest.fixture(scope="session")
def app_url(tmp_path_factory) -> str:
    return launch_app(tmp_path_factory)


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False, download_files=False)


def new_client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False, download_files=False)


def wait_for_outputs(job, n: int = 1, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while len(job.outputs()) < n:
        assert time.monotonic() < deadline, "no streamed output"
        time.sleep(0.02)
    return job.outputs()


def engine_rows(app_url) -> int:
    """Rows the engine is running now (the app's /health, beside the OpenAI routes)."""
    return json.load(urllib.request.urlopen(app_url + "health", timeout=5))["running"]


def wait_until_idle(app_url, timeout: float = 10) -> float:
    """Seconds until the engine runs no row."""
    start = time.monotonic()
    while engine_rows(app_url):
        assert time.monotonic() - start < timeout, "the engine still runs rows"
        time.sleep(0.05)
    return time.monotonic() - start


def normal_chat_seconds(app_url) -> float:
    """How long a short chat from a new client takes."""
    start = time.monotonic()
    assert new_client(app_url).predict("Hello there", max_tokens=8, seed=0, api_name="/chat")
    return time.monotonic() - start


def queue_call(app_url, api_name: str, data: list, leave_after: float | None = None) -> list[dict]:
    """Call a Gradio endpoint with raw HTTP: join the queue, read the event stream; with ``leave_after``,
    drop the connection that many seconds after the run starts, as a client that goes away does.
    Returns the messages read."""
    import httpx

    config = json.load(urllib.request.urlopen(app_url + "config", timeout=5))
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name.strip("/"))
    session = uuid.uuid4().hex
    with httpx.Client(timeout=60) as http:
        body = dict(data=data, fn_index=fn_index, session_hash=session, event_data=None, trigger_id=None)
        http.post(app_url + "gradio_api/queue/join", content=json.dumps(body),  # json.dumps: NaN allowed
                  headers={"content-type": "application/json"}).raise_for_status()
        messages, started = [], None
        with http.stream("GET", app_url + "gradio_api/queue/data", params=dict(session_hash=session)) as events:
            for line in events.iter_lines():
                if not line.startswith("data:"):
                    continue
                messages.append(json.loads(line[5:]))
                kind = messages[-1].get("msg")
                started = started or (time.monotonic() if kind == "process_starts" else None)
                if kind in ("process_completed", "close_stream"):
                    break
                if leave_after is not None and started and time.monotonic() - started >= leave_after:
                    break
    return messages


def chat_data(message: str, temperature: float = 0.7, max_tokens: int = 512) -> list:
    """/chat's inputs in order: message, system_prompt, temperature, top_p, top_k, min_p, repetition_penalty,
    max_tokens, seed, tools_json, role."""
    return [message, "", temperature, 1.0, 50, 0.0, 1.05, max_tokens, -1, "", "user"]


def test_app_binds_localhost_and_disables_analytics(app_url):
    assert app_url.startswith("http://127.0.0.1:")
    page = urllib.request.urlopen(app_url + "config", timeout=5).read().decode()
    assert json.loads(page)["analytics_enabled"] is False


def test_chat_streams_merged_updates(client):
    job = client.submit("Hello! Tell me a story.", max_tokens=300, seed=0, api_name="/chat")
    reply = job.result(timeout=120)
    outputs = job.outputs()
    stats = client.predict(api_name="/history")["last_stats"]
    assert stats["tokens"] == 300 and stats["finish"] == "length"
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:]))  # each update extends the last
    assert outputs[-1] == reply and len(reply) > 300
    assert 3 <= len(outputs) < 300  # streamed, but merged: not one update per token
    seconds = stats["tokens"] / stats["tps"] + stats["ttft_s"]
    assert len(set(outputs)) <= seconds / 0.04 + 3  # at most ~25 distinct updates a second


def test_stop_cancels_generation_at_once(client):
    job = client.submit("Write forever.", max_tokens=20000, seed=0, api_name="/chat")
    wait_for_outputs(job, 2)
    start = time.monotonic()
    job.cancel()
    assert time.monotonic() - start < 2
    time.sleep(0.5)
    history = client.predict(api_name="/history")
    stats = history["last_stats"]
    assert stats["finish"] == "stopped" and stats["tokens"] < 2000
    assert history["messages"][-1]["role"] == "assistant"
    # the model is free again: the next request answers right away
    start = time.monotonic()
    client.predict("Again", max_tokens=5, api_name="/chat")
    assert time.monotonic() - start < 10


def arrival_times(jobs: list, timeout: float = 120) -> list[list[float]]:
    """When each job's streamed outputs arrived (polled every 5 ms), until all are done."""
    seen = [0] * len(jobs)
    times: list[list[float]] = [[] for _ in jobs]
    deadline = time.monotonic() + timeout
    while not all(job.done() for job in jobs):
        assert time.monotonic() < deadline, "the jobs did not finish"
        for i, job in enumerate(jobs):
            n = len(job.outputs())
            if n > seen[i]:
                seen[i] = n
                times[i].append(time.monotonic())
        time.sleep(0.005)
    return times


def test_two_chats_stream_at_the_same_time_with_separate_histories(app_url):
    a, b = new_client(app_url), new_client(app_url)
    first = a.submit("alpha", max_tokens=300, seed=1, api_name="/chat")
    wait_for_outputs(first)
    second = b.submit("beta", max_tokens=100, seed=2, api_name="/chat")
    a_times, b_times = arrival_times([first, second])
    # Rows of one batch: a's tokens keep arriving while b streams, not after it.
    during_b = [t for t in a_times if b_times[0] <= t <= b_times[-1]]
    assert len(b_times) >= 3 and len(during_b) >= 3, (len(b_times), len(during_b))
    sa, sb = a.predict(api_name="/history")["last_stats"], b.predict(api_name="/history")["last_stats"]
    b_started = sb["at"] - sb["ttft_s"] - (sb["tokens"] - 1) / sb["tps"]
    assert b_started < sa["at"] - 0.5 and sa["tokens"] == 300 and sb["tokens"] == 100
    users_a = [m["content"] for m in a.predict(api_name="/history")["messages"] if m["role"] == "user"]
    users_b = [m["content"] for m in b.predict(api_name="/history")["messages"] if m["role"] == "user"]
    assert users_a == ["alpha"] and users_b == ["beta"]
    a.predict(api_name="/reset")
    assert a.predict(api_name="/history")["messages"] == []
    assert len(b.predict(api_name="/history")["messages"]) == 2


def test_second_turn_reuses_the_cached_prompt(client):
    client.predict("Remember the number seven.", system_prompt="Be brief.", max_tokens=20, seed=0, api_name="/chat")
    client.predict("Which number?", system_prompt="Be brief.", max_tokens=20, seed=0, api_name="/chat")
    stats = client.predict(api_name="/history")["last_stats"]
    assert stats["cached"] > 20 and stats["cached"] < stats["prompt"]


@pytest.mark.parametrize("name", ["invoice", "contact_card", "job_posting"])
def test_extract_returns_schema_valid_json(client, name):
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    data = client.predict((SCHEMAS / f"{name}.txt").read_text(), json.dumps(schema), api_name="/extract")
    jsonschema.validate(data, schema)


def test_concurrent_extractions_run_as_rows_of_one_batch(app_url):
    text = (SCHEMAS / "job_posting.txt").read_text() * 3
    most, done = 0, threading.Event()

    def watch():
        nonlocal most
        while not done.is_set():
            most = max(most, engine_rows(app_url))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    jobs = [new_client(app_url).submit(text, SCHEMA, "", 200, api_name="/extract") for _ in range(2)]
    try:
        results = [job.result(timeout=120) for job in jobs]
    finally:
        done.set()
        watcher.join()
    assert all(isinstance(r, dict) for r in results)
    assert most >= 2  # both extractions were in the engine at the same time, not one after the other


def test_bad_inputs_give_clear_messages(client):
    from gradio_client.exceptions import AppError

    cases = [
        (dict(message="   ", api_name="/chat"), "message is empty"),
        (dict(message="hi", tools_json="[{not json", api_name="/chat"), "Tool definitions are not valid JSON"),
        (dict(message="hi", role="system", api_name="/chat"), 'role must be "user" or "tool"'),
        (dict(message="hi", max_tokens="many", api_name="/chat"), "max_tokens must be a whole number"),
        (dict(message="hi", max_tokens=0, api_name="/chat"), "max_tokens must be at least 1"),
        (dict(message="x" * 1_000_000, api_name="/chat"), "1,000,000 characters, more than the 2,048-token context can hold"),
        (dict(message="hi", system_prompt="s" * 9000, api_name="/chat"), "with the system prompt and tools"),
        (dict(text="some text", schema_json="{oops", api_name="/extract"), "schema is not valid JSON"),
        (dict(text="some text", schema_json='{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}',
              api_name="/extract"), "Pointer '/nope' does not exist"),
        (dict(text="some text", schema_json='{"type": 12}', api_name="/extract"), "invalid schema"),
        (dict(text="some text", schema_json='{"type": "object", "required": ["company", "city"]}', max_tokens=2,
              api_name="/extract"),
         r"Max tokens \(2\) is too small for this schema: its shortest complete JSON takes \d+ tokens"),
        (dict(text="some text", schema_json="[" * 100_000, api_name="/extract"), "nested too deeply"),
        (dict(text="some text", schema_json=" " * 2_000_001, api_name="/extract"), "the limit is 2,000,000"),
        (dict(text="some text", schema_json=SCHEMA, instructions="i" * 20_000, api_name="/extract"),
         "the limit is 10,000"),
        (dict(text="  ", schema_json='{"type": "object"}', api_name="/extract"), "source text is empty"),
        (dict(text="x" * 1_000_000, schema_json=SCHEMA, api_name="/extract"),
         "1,000,000 characters; the limit is 200,000 characters"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(AppError, match=expected):
            client.predict(**kwargs)
    assert client.predict("still alive?", max_tokens=3, api_name="/chat")  # the app keeps running


def test_bad_sampling_values_are_refused_and_sampling_still_works(app_url):
    from gradio_client.exceptions import AppError

    client = new_client(app_url)
    for values, expected in [(dict(min_p=2.0), r"min_p must be in \[0, 1\], not 2.0"),
                             (dict(top_k=100000), "top_k must be at most"),
                             (dict(temperature="hot"), "temperature must be a number"),
                             (dict(top_p=0), "top_p must be in")]:
        with pytest.raises(AppError, match=expected):
            client.predict("hi", api_name="/chat", **values)
    # NaN cannot be sent by gradio_client (strict JSON): send it raw.
    messages = queue_call(app_url, "/chat", chat_data("hi", temperature=float("nan")))
    assert "temperature must be in [0, 5], not nan" in messages[-1]["output"]["error"]
    start = time.monotonic()
    reply = new_client(app_url).predict("Tell me something.", temperature=0.7, max_tokens=16, api_name="/chat")
    assert reply and time.monotonic() - start < NORMAL_CHAT_S


def test_a_message_over_the_context_is_refused_but_a_long_chat_rolls(client):
    from gradio_client.exceptions import AppError

    paste = " ".join(f"word{i} and more text" for i in range(300))  # ~6,500 characters, ~3,200 demo tokens
    with pytest.raises(AppError, match=r"is \d,\d{3} tokens; it does not fit the 2,048-token context window"):
        client.predict(paste, max_tokens=10, api_name="/chat")
    half = " ".join(f"word{i} and more text" for i in range(120))  # ~1,300 tokens: two turns overflow the window
    for _ in range(2):
        assert client.predict(half, max_tokens=10, seed=0, api_name="/chat")
    history = client.predict(api_name="/history")
    assert history["window_active"] and history["context_tokens"] > MAX_KV == history["max_kv_size"]
    assert history["last_stats"]["finish"] == "length"


def test_hostile_gradio_requests_never_hold_the_model(app_url):
    """Each hostile request, its client gone, leaves the engine free: a normal chat finishes in seconds."""
    timings = {}
    # A 1 MB message: refused before any tokenizing.
    messages = queue_call(app_url, "/chat", chat_data("x" * 1_000_000), leave_after=0.5)
    assert "more than the 2,048-token context can hold" in messages[-1]["output"]["error"]
    timings["1 MB chat message"] = normal_chat_seconds(app_url)
    # A 1 MB document: refused by the document cap. One under the cap runs in many rows until its client leaves.
    messages = queue_call(app_url, "/extract", ["x" * 1_000_000, SCHEMA, "", 1024], leave_after=0.5)
    assert "the limit is 200,000 characters" in messages[-1]["output"]["error"]
    queue_call(app_url, "/extract", [LONG_DOCUMENT, SCHEMA, "", 1024], leave_after=2.0)
    timings["150,000-character document, rows freed"] = wait_until_idle(app_url)
    timings["150,000-character document"] = normal_chat_seconds(app_url)
    # max_tokens=10**12 is capped; while its client stays, it is one row among others.
    hog = new_client(app_url)
    job = hog.submit("Write forever.", max_tokens=10**12, seed=0, api_name="/chat")
    wait_for_outputs(job, 2)
    timings["max_tokens=10**12, still streaming"] = normal_chat_seconds(app_url)
    assert not job.done()
    job.cancel()
    timings["max_tokens=10**12, rows freed"] = wait_until_idle(app_url)
    stats = hog.predict(api_name="/history")["last_stats"]
    assert stats["finish"] == "stopped" and stats["tokens"] < MAX_KV
    queue_call(app_url, "/chat", chat_data("Write forever.", max_tokens=10**12), leave_after=1.0)
    timings["max_tokens=10**12, client gone, rows freed"] = wait_until_idle(app_url)
    timings["max_tokens=10**12, client gone"] = normal_chat_seconds(app_url)
    print("\n" + "\n".join(f"  after {name}: {seconds:.2f} s" for name, seconds in timings.items()))
    assert all(seconds < NORMAL_CHAT_S for seconds in timings.values()), timings


def test_hostile_openai_requests_never_hold_the_model(app_url):
    """The same probes through the OpenAI routes the app serves under /v1, each connection closed early."""
    import httpx

    def leave_early(path: str, body: dict) -> int:
        with httpx.Client(timeout=60) as http, http.stream("POST", app_url + path, json=body) as response:
            if response.status_code == 200:
                for _, _ in zip(range(5), response.iter_lines()):
                    pass
            return response.status_code

    def normal_request() -> float:
        start = time.monotonic()
        reply = httpx.post(app_url + "v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}).json()
        assert reply["choices"][0]["message"]["content"] is not None
        return time.monotonic() - start

    timings = {}
    huge = "x " * 500_000
    status = leave_early("v1/chat/completions", {"messages": [{"role": "user", "content": huge}], "stream": True})
    timings["1 MB chat message"] = (wait_until_idle(app_url), normal_request())
    assert status == 400
    status = leave_early("v1/completions", {"prompt": huge, "max_tokens": 16, "stream": True})
    timings["1 MB document"] = (wait_until_idle(app_url), normal_request())
    assert status == 400
    status = leave_early("v1/chat/completions", {"messages": [{"role": "user", "content": "Write forever."}],
                                                 "max_tokens": 10**12, "stream": True})
    timings["max_tokens=10**12"] = (wait_until_idle(app_url), normal_request())
    assert status == 200
    print("\n" + "\n".join(f"  /v1 after {name}: rows freed in {free:.2f} s, normal request {seconds:.2f} s"
                           for name, (free, seconds) in timings.items()))
    assert all(seconds < NORMAL_CHAT_S for _, seconds in timings.values()), timings


def test_model_info_describes_the_demo(client):
    info = client.predict(api_name="/model_info")
    assert info["demo"] and info["backend"] in ("CPU", "Metal (Apple GPU)", "CUDA")
    assert info["quantization"] == "none (float32)" and 10 < info["weights_mb"] < 30
    assert info["max_kv_size"] == MAX_KV and info["process_peak_mb"] > 0
    assert info["max_batch"] >= 2 and info["running"] >= 0


# --- the handlers' input checks, without a server ---

def test_uploads_refuse_binary_oversized_and_unsupported_files(tmp_path):
    import gradio as gr

    from app.inputs import MAX_UPLOAD_BYTES, read_upload

    (tmp_path / "ok.md").write_text("# Notes\ncafé")
    assert read_upload(str(tmp_path / "ok.md")) == "# Notes\ncafé"
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "big.txt").write_text("x" * (MAX_UPLOAD_BYTES + 1))
    (tmp_path / "doc.pdf").write_text("%PDF")
    for name, message in [("bin.txt", "looks binary"), ("big.txt", "the limit is"), ("doc.pdf", "unsupported file type")]:
        with pytest.raises(gr.Error, match=message):
            read_upload(str(tmp_path / name))


@pytest.fixture(scope="module")
def demo_runtime(app_url):
    """The demo model in this process (built by the app already): what importing a chat needs."""
    import lfm_mlx

    (path,) = Path(_APP["cache"]).glob("demo-*")
    model, tokenizer = lfm_mlx.load(path)
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, sampling_defaults=lfm_mlx.read_generation_config(path))


def test_malformed_chat_imports_give_one_clear_line(demo_runtime, tmp_path):
    import gradio as gr

    from app.inputs import load_chat

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = {
        "sampling": ({**good, "sampling": [0.7]}, "sampling: must be an object, not a list"),
        "top_k": ({**good, "sampling": {"top_k": 1e9}}, "sampling.top_k: must be an integer"),
        "temperature": ({**good, "sampling": {"temperature": "hot"}}, "sampling.temperature: must be a number"),
        "messages": ({"messages": [{"role": "user"}]}, r"messages\[0\].content: is missing"),
        "roles": ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role"),
        "tool_calls": ({"messages": [{"role": "assistant", "content": "x",
                                      "tool_calls": [{"type": "function", "function": {"name": "f"}}] * 20_000}]},
                       r"messages\[0\].tool_calls\[0\].function.arguments: is missing"),
        "nesting": ("[" * 100_000, "nested too deeply|not valid JSON"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(gr.Error, match=expected) as refused:
            load_chat(demo_runtime, str(path))
        assert "\n" not in refused.value.message and refused.value.message.startswith("Could not import")


def test_rendering_a_chat_with_20000_tool_calls_is_quick():
    from app.chat_tab import MAX_SHOWN_CALLS, render

    content = "<|tool_call_start|>[" + "f(x=1)," * 20_000 + "]<|tool_call_end|>"  # ~140 KB
    assert 135_000 < len(content) < 145_000
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": content}]
    state = types.SimpleNamespace(session=types.SimpleNamespace(messages=messages), stats={}, display=[])
    start = time.perf_counter()
    rows = render(state)
    first = time.perf_counter() - start
    start = time.perf_counter()
    render(state, partial="a reply still streaming")  # what every streamed update costs
    update = time.perf_counter() - start
    print(f"\nrender: {first * 1000:.0f} ms for 20,000 tool calls, then {update * 1000:.2f} ms per streamed update")
    assert first < 10 and update < 0.05
    assert rows[1]["metadata"]["title"] == "Tool calls (20,000): f"
    assert rows[1]["content"].count("\n") == MAX_SHOWN_CALLS + 2 and "19,900 more calls" in rows[1]["content"]


def test_highlights_and_tables_from_an_extraction():
    from app.extract_tab import array_fields, highlighted_html, highlights, table

    text = "Ann paid 5 EUR to Bob."
    spans = {"$.payer": (0, 3), "$.payee": (18, 21), "$.items[0].name": None}
    assert highlights(text, spans) == [("Ann", "payer"), (" paid 5 EUR to ", None), ("Bob", "payee"), (".", None)]
    data = {"items": [{"name": "tea", "price": 2}, {"name": "jam"}], "tags": ["a"]}
    assert list(array_fields(data)) == ["items", "tags"]
    assert table(data["items"]) == [["name", "price"], ["tea", "2"], ["jam", ""]]
    assert table(["a"]) == [["value"], ["a"]] and table([]) == [["(no items)"]]
    shown = highlighted_html("Ann <b>\n\npaid</b> Bob.", {"$.payer": (0, 3), "$.payee": (18, 21), "$.x": None})
    assert shown.count("<mark") == 2 and "&lt;b&gt;\n\npaid&lt;/b&gt;" in shown  # escaped, breaks kept
    assert 'title="payer">Ann</mark>' in shown and '>payee</span>' in shown
    assert "no extracted value" in highlighted_html("text", {"$.a": None})


def test_runtime_switches_models_and_the_sessions_and_the_api_follow(tiny_checkpoint, tmp_path):
    from app.runtime import Runtime
    from app.sessions import Sessions
    from lfm_mlx import demo
    from lfm_mlx.api import Limits
    from lfm_mlx.resolve import ModelChoice
    from lfm_mlx.server import Server

    runtime = Runtime(ModelChoice(demo.build_demo(tmp_path / "demo"), "demo", demo=True), max_kv_size=256)
    sessions = Sessions(runtime)
    server = Server(runtime.engine, "demo", limits=Limits(context=256, max_tokens=64))
    runtime.on_switch.append(lambda rt: server.switch(rt.engine, rt.choice.name, kv_bits=rt.kv_bits,
                                                      limits=Limits(context=rt.context, max_tokens=64)))
    before, old_engine = sessions.get(None), runtime.engine
    assert len(list(before.session.send("Hi", max_tokens=3))) == 3
    try:
        runtime.switch(ModelChoice(tiny_checkpoint, "tiny"), 512, 8)
        assert (runtime.choice.name, runtime.context, runtime.kv_bits) == ("tiny", 512, 8)
        assert (server.engine, server.model_id, server.limits.context, server.kv_bits) == (runtime.engine, "tiny", 512, 8)
        assert not old_engine.threaded and runtime.model is not old_engine.model
        state = sessions.get(None)
        assert state is not before and state.session.engine is runtime.engine  # conversations start over
        assert len(list(state.session.send("Hi", max_tokens=3, temperature=0))) == 3
        with pytest.raises(RuntimeError, match="the engine has stopped"):  # a turn of the old model's session
            list(before.session.send("Still there?", max_tokens=3))
    finally:
        runtime.engine.stop()


def test_runtime_stream_merges_a_fast_stream_and_cancels_when_closed():
    from app.runtime import Runtime

    runtime = Runtime.__new__(Runtime)  # the stream machinery only: no model

    def tokens(emit):
        for i in range(200):
            time.sleep(0.002)
            emit(i)

    stop, idle = threading.Event(), threading.Event()
    batches = [b for b in runtime.stream(tokens, stop, idle) if b]
    assert [x for b in batches for x in b] == list(range(200))
    assert len(batches[0]) == 1  # the first token is shown at once
    assert len(batches) < 30  # ~0.5 s of tokens in 40 ms batches, not 200 updates
    assert idle.wait(1)

    def until_cancelled(emit):  # as the library does with its cancel event: stop within a step
        while not stop.wait(0.01):
            emit("token")

    stop, idle = threading.Event(), threading.Event()
    stream = runtime.stream(until_cancelled, stop, idle)
    next(stream)
    stream.close()  # what Gradio does when the client leaves or presses Stop
    assert stop.is_set() and idle.wait(1)

    def fails(emit):
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        list(runtime.stream(fails, threading.Event()))


def test_a_failed_turn_leaves_no_reply_stats_and_frees_the_session():
    from app.runtime import Runtime
    from app.sessions import ChatState, run_turn

    session = types.SimpleNamespace(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    runtime = Runtime.__new__(Runtime)  # no model: a session that fails before its first token
    runtime.new_session = lambda: session
    state = ChatState(runtime)
    state.stats = {1: {"tokens": 2}, 3: {"tokens": 9}}  # 3: the stats of a reply since undone

    def start(s, cancel):
        s.messages.append({"role": "user", "content": "again"})
        return iter(())  # the library adds no reply when none was generated

    assert list(run_turn(runtime, state, start)) == []
    assert state.stats == {1: {"tokens": 2}} and state.idle.is_set()

    def fails(s, cancel):
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        list(run_turn(runtime, state, fails))
    assert state.idle.is_set()  # the next turn can start at once


def test_tool_calls_render_as_tool_call_messages():
    from app.chat_tab import _assistant_messages

    reply = 'Let me check.<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
    stats = dict(ttft_s=0.05, tokens=20, tps=100.0, peak_mb=50.0, cached=0, prompt=30, finish="stop", at=0.0)
    text, call, footer = _assistant_messages(reply, stats)
    assert text == {"role": "assistant", "content": "Let me check."}
    assert call["metadata"] == {"title": "Tool call: get_weather"}
    assert 'get_weather(city="Paris")' in call["content"] and "<|tool_call" not in call["content"]
    assert "reply-stats" in footer["content"] and "20 tokens" in footer["content"]
    streaming = _assistant_messages('<|tool_call_start|>[get_weather(ci', None, streaming=True)
    assert streaming[0]["metadata"]["status"] == "pending"
    two = _assistant_messages(reply + "\n" + reply.split("Let me check.")[1], None)
    assert [m.get("metadata", {}).get("title") for m in two] == [None, "Tool calls (2): get_weather"]


def test_the_app_log_holds_no_traceback_after_user_errors(app_url):
    """Runs after every test above has sent the app bad input: refusals are one line at most."""
    log = Path(_APP["log"]).read_text()
    assert "Traceback" not in log, log[-5000:]


def test_the_soak_reports_the_peak_memory_of_each_minute():
    from app.soak import by_minute

    samples = [(100.0, 400.0), (130.0, 450.0), (161.0, 500.0), (219.0, 480.0), (230.0, 470.0)]
    assert by_minute(samples) == "resident memory by minute (MB, peak of each): 450 500 470"
    assert by_minute([]) == ""


def test_the_soak_separates_what_hostile_clients_cost_from_what_the_clients_number_costs():
    from app.soak import report

    def rec(move, seconds, outcome="ok", normal=True):
        return {"move": move, "normal": normal, "outcome": outcome, "seconds": seconds}

    alone = {"normal chat": [0.1] * 20}
    only_normal = [rec("normal chat", 0.4)] * 20 + [rec("normal chat", 9.0, "chat: HTTP 500"),
                                                     rec("normal chat", 120, "STUCK")]
    soak = [rec("normal chat", 0.5)] * 20 + [rec("1 MB message", 0.01, "refused 400", normal=False)]
    text = report(soak, alone, only_normal, [(0.0, 400.0), (70.0, 420.0)], True, False, 1, 16)
    row = [line for line in text.splitlines() if line.startswith("normal chat")][-1]  # the latency row
    assert row.split()[-6:] == ["0.40", "0.40", "0.50", "0.50", "5.00x", "1.25x"]
    assert "worst p95 under the soak / p95 alone: 5.00x" in text
    assert "stuck clients: 1;" in text  # a request stuck in either phase is counted
