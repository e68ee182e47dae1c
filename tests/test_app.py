"""The web app through its API (gradio_client), against `python -m app --demo` started once for the session."""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "assets" / "schemas"
MAX_KV = 2048  # small, so a paste longer than the context is quick to send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_APP: dict = {}


def launch_app(tmp_path_factory) -> str:
    """The app on the demo model, on a free port, with its own model cache: started once per test run
    (test_browser.py uses it too) and stopped when Python exits."""
    if "url" in _APP:
        return _APP["url"]
    port = free_port()
    env = {**os.environ, "LFM_MLX_CACHE": str(tmp_path_factory.mktemp("cache")), "GRADIO_ANALYTICS_ENABLED": "False"}
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
    _APP.update(url=url, proc=proc)
    return url


@pytest.fixture(scope="session")
def app_url(tmp_path_factory) -> str:
    return launch_app(tmp_path_factory)


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False, download_files=False)


def wait_for_outputs(job, n: int = 1, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while len(job.outputs()) < n:
        assert time.monotonic() < deadline, "no streamed output"
        time.sleep(0.02)
    return job.outputs()


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


def test_two_clients_keep_separate_histories_and_queue(app_url):
    from gradio_client import Client

    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    first = a.submit("alpha", max_tokens=250, seed=1, api_name="/chat")
    wait_for_outputs(first)
    second = b.submit("beta", max_tokens=20, seed=2, api_name="/chat")
    first.result(timeout=120)
    second.result(timeout=120)
    # b waited for a: its prompt was read only after a's last token (one model call at a time)
    sa, sb = a.predict(api_name="/history")["last_stats"], b.predict(api_name="/history")["last_stats"]
    b_started = sb["at"] - sb["ttft_s"] - (sb["tokens"] - 1) / sb["tps"]
    assert b_started >= sa["at"] - 0.1
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


def test_bad_inputs_give_clear_messages(client):
    from gradio_client.exceptions import AppError

    cases = [
        (dict(message="   ", api_name="/chat"), "message is empty"),
        (dict(message="hi", tools_json="[{not json", api_name="/chat"), "Tool definitions are not valid JSON"),
        (dict(message="hi", role="system", api_name="/chat"), 'role must be "user" or "tool"'),
        (dict(text="some text", schema_json="{oops", api_name="/extract"), "schema is not valid JSON"),
        (dict(text="some text", schema_json='{"type": "object", "if": {}}', api_name="/extract"),
         "unsupported schema keyword 'if'"),
        (dict(text="some text", schema_json='{"type": 12}', api_name="/extract"), "invalid schema"),
        (dict(text="  ", schema_json='{"type": "object"}', api_name="/extract"), "source text is empty"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(AppError, match=expected):
            client.predict(**kwargs)
    assert client.predict("still alive?", max_tokens=3, api_name="/chat")  # the app keeps running


def test_paste_longer_than_the_context_rolls_the_window(client):
    paste = " ".join(f"word{i} and more text" for i in range(400))  # > MAX_KV tokens
    reply = client.predict(paste, max_tokens=10, seed=0, api_name="/chat")
    history = client.predict(api_name="/history")
    assert reply and history["window_active"] and history["context_tokens"] > MAX_KV == history["max_kv_size"]
    assert history["last_stats"]["finish"] == "length"


def test_model_info_describes_the_demo(client):
    info = client.predict(api_name="/model_info")
    assert info["demo"] and info["backend"] in ("CPU", "Metal (Apple GPU)", "CUDA")
    assert info["quantization"] == "none (float32)" and 10 < info["weights_mb"] < 30
    assert info["max_kv_size"] == MAX_KV and info["process_peak_mb"] > 0


# --- the handlers' input checks, without a server ---

def test_uploads_refuse_binary_oversized_and_unsupported_files(tmp_path):
    import gradio as gr

    from app.ui import MAX_UPLOAD_BYTES, read_upload

    (tmp_path / "ok.md").write_text("# Notes\ncafé")
    assert read_upload(str(tmp_path / "ok.md")) == "# Notes\ncafé"
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "big.txt").write_text("x" * (MAX_UPLOAD_BYTES + 1))
    (tmp_path / "doc.pdf").write_text("%PDF")
    for name, message in [("bin.txt", "looks binary"), ("big.txt", "the limit is"), ("doc.pdf", "unsupported file type")]:
        with pytest.raises(gr.Error, match=message):
            read_upload(str(tmp_path / name))


def test_highlights_and_tables_from_an_extraction():
    from app.ui import array_fields, highlights, table

    text = "Ann paid 5 EUR to Bob."
    spans = {"$.payer": (0, 3), "$.payee": (18, 21), "$.items[0].name": None}
    assert highlights(text, spans) == [("Ann", "payer"), (" paid 5 EUR to ", None), ("Bob", "payee"), (".", None)]
    data = {"items": [{"name": "tea", "price": 2}, {"name": "jam"}], "tags": ["a"]}
    assert list(array_fields(data)) == ["items", "tags"]
    assert table(data["items"]) == [["name", "price"], ["tea", "2"], ["jam", ""]]
    assert table(["a"]) == [["value"], ["a"]]


def test_runtime_merges_a_fast_stream_into_few_batches():
    from app import Runtime

    runtime = Runtime.__new__(Runtime)  # the thread machinery only: no model
    import queue

    runtime._jobs = queue.SimpleQueue()
    threading.Thread(target=runtime._serve, daemon=True).start()

    def tokens():
        for i in range(200):
            time.sleep(0.002)
            yield i

    stop, idle = threading.Event(), threading.Event()
    batches = [b for b in runtime.stream(tokens, stop, idle) if b]
    assert [x for b in batches for x in b] == list(range(200))
    assert len(batches[0]) == 1  # the first token is shown at once
    assert len(batches) < 30  # ~0.5 s of tokens in 40 ms batches, not 200 updates
    assert idle.wait(1)

    stop, idle = threading.Event(), threading.Event()
    stream = runtime.stream(lambda: iter(tokens()), stop, idle)
    next(stream)
    stream.close()  # what Gradio does on cancel
    assert idle.wait(1) and stop.is_set()


def test_tool_calls_render_as_tool_call_messages():
    from app.ui import _assistant_messages

    reply = 'Let me check.<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
    stats = dict(ttft_s=0.05, tokens=20, tps=100.0, peak_mb=50.0, cached=0, prompt=30, finish="stop", at=0.0)
    text, call, footer = _assistant_messages(reply, stats)
    assert text == {"role": "assistant", "content": "Let me check."}
    assert call["metadata"] == {"title": "Tool call: get_weather"}
    assert 'get_weather(city="Paris")' in call["content"] and "<|tool_call" not in call["content"]
    assert "reply-stats" in footer["content"] and "20 tokens" in footer["content"]
    streaming = _assistant_messages('<|tool_call_start|>[get_weather(ci', None)
    assert streaming[0]["metadata"]["status"] == "pending"
