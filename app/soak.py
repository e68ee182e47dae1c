"""Soak the app as careless and hostile clients would: ``python -m app.soak [--minutes 10] [--clients 16]``.

Starts ``python -m app`` (the demo model unless ``--model``) on a free loopback port and measures
normal requests alone; then ``--clients`` clients send only normal requests for
``--normal-only-minutes`` (the latency their own number gives); then they are let loose for
``--minutes``: each picks, at random, a normal chat (the OpenAI route, streamed), a normal extraction
(the app's ``/extract`` API), a reply that would run forever (``max_tokens=10**12``) or a stream it
abandons after the first chunk, a 1 MB message or document, a malformed body, bad sampling values, a
bad or cyclic schema, an unknown role or an invalid tool-call history. Every request has a deadline;
nothing leaves the machine. It prints requests served by kind, the latency of the normal ones (alone,
normal-only and under the soak), outcomes by kind, the app's resident memory over time, and whether
the app still answers at the end; the exit status is non-zero if it does not, if a client got stuck,
or if the app crashed.

A program, not a test: it runs for minutes and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import httpx

from lfm_mlx.bench_serve import free_port, process_memory_mb, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 2048  # the app's --max-kv-size: long enough for chats, short enough that floods are refused fast
DEADLINE_S = 120.0  # a request still unanswered after this is a stuck client
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "total": {"type": "number"}},
          "required": ["name", "total"]}
CYCLIC_SCHEMA = {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"],
                 "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}}
WORDS = "invoice total paid order customer shipped city street date amount note report item".split()
MB = "word " * 200_000  # 1 MB of text


class App:
    """``python -m app`` on a loopback port, its output in a log file."""

    def __init__(self, model: Optional[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkdtemp(prefix="lfm-soak-")) / "app.log"
        choice = ["--model", model] if model else ["--demo"]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "LFM_MLX_CACHE": str(self.log.parent / "cache")}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app", *choice, "--port", str(self.port), "--max-kv-size", str(CONTEXT)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        wait_healthy(self.process, self.url, self.log, "the app", timeout)

    def rss_mb(self) -> float:
        return process_memory_mb(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- the clients' moves ---------------------------------------------------------------------------------
# Each returns an outcome label; "ok" marks a normal request that was served.

def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


async def normal_chat(http: httpx.AsyncClient, rng: random.Random) -> str:
    body = {"messages": _user(" ".join(rng.choices(WORDS, k=rng.randint(5, 60)))), "max_tokens": 16,
            "temperature": 0.7, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return f"chat: HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return "ok"
    return "chat: stream ended without [DONE]"


class GradioUser:
    """One user of the app's own API (``/extract``): one ``gradio_client.Client``, made at first use and
    kept, as a script or pipeline keeps it. (Making a client fetches the app's config and API info: about
    a second and 75 ms of the app's CPU each time, which would be measured as the extraction's latency.)"""

    def __init__(self, url: str):
        self.url = url
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from gradio_client import Client

            self._client = Client(self.url + "/", verbose=False)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def normal_extraction(user: GradioUser, rng: random.Random) -> str:
    text = f"Invoice from {rng.choice(['Ada', 'Bo', 'Cy'])} Ltd, total {rng.randint(1, 999)}.{rng.randint(0, 99)} EUR."
    data = user.client.predict(text, json.dumps(SCHEMA), "", 64, api_name="/extract")
    return "ok" if isinstance(data, dict) and {"name", "total"} <= data.keys() else "extract: not the schema's object"


async def endless_reply(http: httpx.AsyncClient, rng: random.Random) -> str:
    """max_tokens=10**12, streamed, abandoned after a moment: the row must be freed."""
    body = {"messages": _user("Go on forever."), "max_tokens": 10**12, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return f"refused {r.status_code}"
        until = time.monotonic() + rng.uniform(0.2, 3.0)
        async for _ in r.aiter_lines():
            if time.monotonic() > until:
                break
    return "abandoned"


async def abrupt_disconnect(http: httpx.AsyncClient, rng: random.Random) -> str:
    body = {"messages": _user(" ".join(rng.choices(WORDS, k=200))), "max_tokens": 200, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        async for _ in r.aiter_lines():
            break
    return "abandoned"


async def flood(http: httpx.AsyncClient, rng: random.Random) -> str:
    """A 1 MB message: refused by size (413) or by the context (400), never prefilled."""
    body = {"messages": _user(MB), "max_tokens": 8}
    r = await http.post("/v1/chat/completions", json=body)
    return f"refused {r.status_code}" if r.status_code >= 400 else f"served a 1 MB prompt?! ({r.status_code})"


def flood_extraction(user: GradioUser, rng: random.Random) -> str:
    """A 1 MB document through the app's own API, abandoned after a second."""
    job = user.client.submit(MB, json.dumps(SCHEMA), "", 64, api_name="/extract")
    try:
        job.result(timeout=1.0)
        return "served a 1 MB document?!"
    except TimeoutError:
        job.cancel()
        return "abandoned"
    except Exception as e:  # gradio_client raises the app's message as AppError
        return "refused (app error)" if "AppError" in type(e).__name__ else f"extract flood: {type(e).__name__}"


BAD_BODIES = [
    ("malformed JSON", b"{not json"),
    ("bad sampling", {"messages": _user("hi"), "min_p": 2.0}),
    ("bad sampling", {"messages": _user("hi"), "top_k": 100000}),
    ("bad sampling", {"messages": _user("hi"), "temperature": "hot"}),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("lone surrogate", {"messages": _user("hi \ud800")}),
    ("bad schema", {"messages": _user("hi"), "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}),
    ("cyclic schema", {"messages": _user("hi"), "response_format": {"type": "json_schema", "json_schema": {
        "schema": CYCLIC_SCHEMA}}}),
    ("bad tool history", {"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
    ("wrong types", {"messages": "hello", "max_tokens": "ten"}),
]


async def malformed(http: httpx.AsyncClient, rng: random.Random) -> str:
    kind, body = rng.choice(BAD_BODIES)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
    return f"refused {r.status_code}" if ok else f"{kind}: HTTP {r.status_code} {r.text[:80]}"


MOVES = [  # (weight, name, move, is it a normal request, runs in a thread)
    (30, "normal chat", normal_chat, True, False),
    (15, "normal extraction", normal_extraction, True, True),
    (10, "endless reply", endless_reply, False, False),
    (10, "abrupt disconnect", abrupt_disconnect, False, False),
    (8, "1 MB message", flood, False, False),
    (5, "1 MB document", flood_extraction, False, True),
    (22, "malformed request", malformed, False, False),
]


async def client(url: str, seed: int, until: float, records: list, moves: list) -> None:
    rng = random.Random(seed)
    weights = [m[0] for m in moves]
    user = GradioUser(url)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(DEADLINE_S, connect=10)) as http:
        while time.monotonic() < until:
            _, name, move, normal, threaded = rng.choices(moves, weights)[0]
            start = time.monotonic()
            try:
                call = asyncio.to_thread(move, user, random.Random(rng.random())) if threaded else move(http, rng)
                outcome = await asyncio.wait_for(call, DEADLINE_S)
            except asyncio.TimeoutError:
                outcome = "STUCK"
            except Exception as e:
                outcome = f"{type(e).__name__}: {str(e)[:80]}"
            records.append({"move": name, "normal": normal, "outcome": outcome, "seconds": time.monotonic() - start})
    await asyncio.to_thread(user.close)


async def clients(url: str, n: int, minutes: float, records: list, moves: list) -> None:
    """``n`` clients making ``moves`` for ``minutes``, each starting its next move when one ends."""
    until = time.monotonic() + minutes * 60
    await asyncio.gather(*(client(url, seed, until, records, moves) for seed in range(n)))


async def baseline(url: str, n: int) -> dict[str, list[float]]:
    """Normal chats and extractions, ``n`` of each, one at a time on an idle, warmed-up app: the
    unloaded latency."""
    rng, times, user = random.Random(0), defaultdict(list), GradioUser(url)
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as http:
        # One of each first, unmeasured: the first request of a fresh process pays its warm-up (one took
        # 12 s), which is not the latency the soak is compared with.
        await normal_chat(http, rng)
        await asyncio.to_thread(normal_extraction, user, rng)
        for i in range(2 * n):
            start = time.monotonic()
            if i % 2:
                name, outcome = "normal extraction", await asyncio.to_thread(normal_extraction, user, rng)
            else:
                name, outcome = "normal chat", await normal_chat(http, rng)
            if outcome != "ok":
                raise RuntimeError(f"a normal request failed on the idle app: {outcome}")
            times[name].append(time.monotonic() - start)
    await asyncio.to_thread(user.close)
    return dict(times)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def still_answers(url: str) -> bool:
    try:
        body = {"messages": _user("Still there?"), "max_tokens": 4, "temperature": 0.7}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        return r.status_code == 200 and httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def served(records: list) -> dict[str, list[float]]:
    """The latencies of the normal requests that were served, by move."""
    normal = defaultdict(list)
    for r in records:
        if r["normal"] and r["outcome"] == "ok":
            normal[r["move"]].append(r["seconds"])
    return normal


def stuck(records: list) -> int:
    """Requests still unanswered at their deadline."""
    return sum(r["outcome"] == "STUCK" for r in records)


def report(records: list, alone: dict[str, list[float]], only_normal_records: list,
           memory: list[tuple[float, float]], answering: bool, crashed: bool, minutes: float, clients: int) -> str:
    normal, only_normal = served(records), served(only_normal_records)
    lines = [f"soak: {clients} clients for {minutes:g} min, {len(records)} requests",
             "", f"{'move':20s} {'sent':>6s}  outcomes"]
    by_move = defaultdict(Counter)
    for r in records:
        by_move[r["move"]][r["outcome"]] += 1
    for name in (m[1] for m in MOVES):
        outcomes = ", ".join(f"{k} ×{v}" for k, v in by_move[name].most_common())
        lines.append(f"{name:20s} {sum(by_move[name].values()):6d}  {outcomes}")
    lines += ["", f"latency of normal requests (s)  {'alone p50':>9s} {'p95':>6s}  "
              f"{'normal-only p50':>15s} {'p95':>6s}  "
              f"{'soak p50':>8s} {'p95':>6s}  {'soak/alone':>10s} {'soak/normal-only':>16s}"]
    ratios = []
    for name in alone:
        own = only_normal[name]
        ratios.append(percentile(normal[name], .95) / percentile(alone[name], .95))
        lines.append(f"{name:31s} {percentile(alone[name], .5):9.2f} {percentile(alone[name], .95):6.2f}  "
                     f"{percentile(own, .5):15.2f} {percentile(own, .95):6.2f}  "
                     f"{percentile(normal[name], .5):8.2f} {percentile(normal[name], .95):6.2f}  {ratios[-1]:9.2f}x "
                     f"{percentile(normal[name], .95) / percentile(own, .95):15.2f}x")
    rss = [m for _, m in memory]
    third = max(1, len(rss) // 3)
    lines += [f"(p95 ratios; normal-only: the same {clients} clients sending only normal requests, the load they put on"
              " the app by themselves)",
              f"worst p95 under the soak / p95 alone: {max(ratios):.2f}x", "",
              f"resident memory (MB): start {rss[0]:.0f}, peak {max(rss):.0f}, end {rss[-1]:.0f}; "
              f"mean of the first third {statistics.mean(rss[:third]):.0f}, of the last third "
              f"{statistics.mean(rss[-third:]):.0f}" if rss else "resident memory: not measured",
              by_minute(memory),
              f"stuck clients: {stuck(records + only_normal_records)}; app crashed: {crashed}; "
              f"still answering at the end: {answering}"]
    return "\n".join(lines)


def by_minute(memory: list[tuple[float, float]]) -> str:
    """The largest resident size in each minute of the soak: a plateau is flat memory, a climb is a leak."""
    if not memory:
        return ""
    start, peaks = memory[0][0], defaultdict(float)
    for t, mb in memory:
        minute = int((t - start) // 60)
        peaks[minute] = max(peaks[minute], mb)
    return "resident memory by minute (MB, peak of each): " + " ".join(f"{peaks[m]:.0f}" for m in sorted(peaks))


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--model", help="a local checkpoint (default: the random-weight demo model)")
    p.add_argument("--baseline", type=int, default=10, help="normal chats and extractions (each) measured on the idle app first")
    p.add_argument("--normal-only-minutes", type=float, default=1.0,
                   help="then the same clients sending only normal requests for this long: what their own load costs")
    p.add_argument("--json", help="also write every request's record here")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.baseline < 1 or args.normal_only_minutes <= 0:
        p.error("--minutes, --clients, --baseline and --normal-only-minutes must be positive")
    app = App(args.model)
    memory: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            memory.append((time.monotonic(), app.rss_mb()))

    try:
        app.wait_ready()
        alone = asyncio.run(baseline(app.url, args.baseline))
        only_normal: list = []
        asyncio.run(clients(app.url, args.clients, args.normal_only_minutes, only_normal, [m for m in MOVES if m[3]]))
        memory.append((time.monotonic(), app.rss_mb()))
        threading.Thread(target=sample, daemon=True).start()
        records: list = []
        asyncio.run(clients(app.url, args.clients, args.minutes, records, MOVES))
        done.set()
        crashed = app.process.poll() is not None
        answering = not crashed and still_answers(app.url)
        memory.append((time.monotonic(), app.rss_mb()))
    except RuntimeError as e:
        print(f"python -m app.soak: error: {e}", file=sys.stderr)
        return 2
    finally:
        done.set()
        app.stop()
    print(report(records, alone, only_normal, memory, answering, crashed, args.minutes, args.clients))
    tracebacks = app.log.read_text(errors="replace").count("Traceback")
    print(f"tracebacks in the app's log: {tracebacks} ({app.log})")
    if args.json:
        Path(args.json).write_text(json.dumps({"records": records, "alone": alone, "normal_only": only_normal,
                                                  "memory": memory}, indent=1))
    return 0 if answering and not stuck(records + only_normal) and not crashed else 1


if __name__ == "__main__":
    sys.exit(main())
