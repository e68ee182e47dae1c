"""The app in a real browser: Debian's Chromium driven by Playwright, against the demo-model app.

Covers: a chat message streams into the page, and the page is still in step at the end of a 2,000-token
reply (the lag is measured and printed); Stop halts a reply at once; Undo and Retry; importing a chat with
20,000 tool calls, and refusals of malformed ones; an extraction preset gives JSON; a schema editor edit
gives highlighted source values and an array table; Stop ends an extraction and a batch, keeping the
batch's finished results. Takes the README's screenshots: into assets/screenshots/ with
LFM_MLX_SCREENSHOTS=1, else into a temporary folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from test_app import _APP, LONG_DOCUMENT, ROOT, launch_app, wait_until_idle

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "assets" / "screenshots"
# Values the schema allows all appear in the job posting, so even the random demo model extracts
# grounded values: what the highlight view needs to show something.
GROUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "company": {"enum": ["Kestrel Analytics"]},
        "city": {"enum": ["Amsterdam"]},
        "employment_type": {"enum": ["full-time"]},
        "work_mode": {"enum": ["hybrid"]},
        "skills": {"type": "array", "items": {"enum": ["Python", "Apache Spark", "Airflow"]}, "minItems": 2},
    },
    "required": ["company", "city", "employment_type", "work_mode", "skills"],
}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)")

LAST_BOT = "() => { const m = document.querySelectorAll('[data-testid=bot]'); return m.length ? m[m.length - 1] : null; }"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    if os.environ.get("LFM_MLX_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    app_url = launch_app(tmp_path_factory)  # the same app process as test_app.py's
    # OpenBLAS preloaded into Chromium's processes breaks its thread creation: keep it out of the browser.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    saved = os.environ.pop("LD_PRELOAD", None)
    try:
        playwright = sync_playwright().start()
    finally:
        if saved is not None:
            os.environ["LD_PRELOAD"] = saved
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, env=env)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(app_url, wait_until="domcontentloaded")  # not networkidle: Gradio keeps a stream open
    page.wait_for_selector("#message textarea")
    yield page
    browser.close()
    playwright.stop()


def last_bot_text(page) -> str:
    return page.evaluate(f"() => {{ const m = ({LAST_BOT})(); return m ? m.innerText : ''; }}")


def last_reply_words(page) -> str:
    """The last reply's text without its stats line, read from the DOM (innerText depends on layout,
    which may still be settling)."""
    return page.evaluate(f"""() => {{
        const m = ({LAST_BOT})();
        if (!m) return '';
        const copy = m.cloneNode(true);
        copy.querySelectorAll('.reply-stats').forEach(s => s.remove());
        return copy.textContent;
    }}""")


def send(page, text: str, max_tokens: int) -> None:
    page.fill("#max-tokens input", str(max_tokens))
    page.fill("#message textarea", text)
    page.click("#send")


def wait_for_stats(page, previous_at: float = 0.0) -> dict:
    """Poll every 10 ms for the finished reply's stats line; returns its text and how long after the
    server sent it the page showed it."""
    handle = page.wait_for_function(
        f"""(previous) => {{
            const m = ({LAST_BOT})();
            const s = m && m.querySelector('.reply-stats');
            const at = s ? Date.parse(s.title.replace('finished at ', '')) / 1000 : NaN;
            if (!(at > previous)) return null;
            return {{text: s.innerText, at: at, lag: Date.now() / 1000 - at}};
        }}""", arg=previous_at, polling=10)
    return handle.json_value()


def test_chat_streams_and_the_page_keeps_up_with_a_2000_token_reply(page):
    page.evaluate("""() => {
        window.updates = [];
        window.observer = new MutationObserver(() => {
            const m = document.querySelectorAll('[data-testid=bot]');
            if (m.length) window.updates.push(m[m.length - 1].textContent.length);
        });
        window.observer.observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
    }""")
    send(page, "Tell me a long story about Lisbon.", 2000)
    # The cursor shows at once, alone, before the first token: wait for text beside it.
    page.wait_for_function(f"() => {{ const m = ({LAST_BOT})(); "
                           "return m && m.innerText.includes('▌') && m.innerText.replace('▌', '').trim().length > 0; }")
    streaming = last_bot_text(page)
    stats = wait_for_stats(page)
    final = last_bot_text(page)
    lengths = page.evaluate("() => { window.observer.disconnect(); return [...new Set(window.updates)]; }")
    assert "2000 tokens" in stats["text"] and "▌" not in final
    assert 0 < len(streaming.replace("▌", "").strip()) < len(final)  # text was shown before the end
    assert len(lengths) > 20  # many partial updates reached the page
    print(f"\nUI lag after a 2,000-token reply: {stats['lag'] * 1000:.0f} ms; {stats['text']}; "
          f"{len(lengths)} distinct page updates")
    assert stats["lag"] < 5.0  # generous: a shared 2-core CI box; on a quiet machine it is ~0.1-0.3 s


def test_enter_sends_and_shift_enter_breaks_the_line(page):
    before = page.evaluate(f"""() => {{
        const s = ({LAST_BOT})()?.querySelector('.reply-stats');
        return s ? Date.parse(s.title.replace('finished at ', '')) / 1000 : 0; }}""")
    page.fill("#max-tokens input", "8")
    box = page.locator("#message textarea")
    box.click()
    page.keyboard.type("First line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert box.input_value() == "First line\nsecond line"
    page.keyboard.press("Enter")
    stats = wait_for_stats(page, before)
    assert "8 tokens" in stats["text"] and box.input_value() == ""
    assert page.locator("[data-testid=user]").last.inner_text().split() == ["First", "line", "second", "line"]


def test_stop_halts_the_reply_at_once(page):
    page.click("#clear")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=bot]').length === 0")
    send(page, "Write without end.", 20000)
    page.wait_for_function(f"() => {{ const m = ({LAST_BOT})(); return m && m.innerText.length > 50; }}")
    sent = []
    page.on("request", lambda r: sent.append(time.time()) if r.url.endswith("/run/predict") else None)
    clicked = time.time()
    page.click("#stop")
    stats = wait_for_stats(page)
    # The server's last token came right after the stop request; a busy page may send it a little late.
    assert "stopped" in stats["text"] and sent and stats["at"] - sent[0] < 1.0
    print(f"\nStop: request sent {(sent[0] - clicked) * 1000:.0f} ms after the click, last token "
          f"{(stats['at'] - sent[0]) * 1000:.0f} ms after the request, shown {stats['lag'] * 1000:.0f} ms later")
    reply = last_reply_words(page)
    time.sleep(1.0)
    assert last_reply_words(page) == reply  # nothing arrives after Stop
    tokens = int(stats["text"].split(" tokens")[0].split("· ")[-1])
    assert tokens < 20000
    page.click("#stop")  # with no reply running: it cancels what may wait in the queue, and nothing else
    send(page, "Still there?", 6)
    assert "6 tokens" in wait_for_stats(page, stats["at"])["text"]


def test_undo_and_retry(page, screenshots):
    page.click("#clear")
    send(page, "First question", 30)
    first = wait_for_stats(page)
    page.click("#undo")
    page.wait_for_function("() => document.querySelector('#message textarea').value === 'First question'")
    assert page.locator("[data-testid=user]").count() == 0
    page.fill("#message textarea", "")
    page.fill("#system textarea", "You are a concise assistant.")
    send(page, "Hello! What can you do?", 40)
    answer = wait_for_stats(page, first["at"])
    page.click("#retry")
    again = wait_for_stats(page, answer["at"])
    assert page.locator("[data-testid=user]").count() == 1 and "40 tokens" in again["text"]
    assert int(again["text"].split(" prompt tokens cached")[0].split("· ")[-1].split("/")[0]) > 0  # re-used
    send(page, "And in one sentence?", 30)
    wait_for_stats(page, again["at"])
    page.screenshot(path=str(screenshots / "chat.png"))


def upload(page, button: str, *files: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click(button)
    chooser.value.set_files([str(f) for f in files])


def test_export_then_import_a_conversation(page, tmp_path):
    page.fill("#slider-temperature input[type=number]", "0.55")
    page.press("#slider-temperature input[type=number]", "Tab")
    before = wait_for_stats(page)
    send(page, "Once more.", 5)
    wait_for_stats(page, before["at"])
    page.click("#export")
    link = page.wait_for_selector("#export-file a[href*='.json']")
    saved = page.request.get(link.get_attribute("href")).json()
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 3
    assert saved["system"] == "You are a concise assistant."
    assert saved["sampling"]["temperature"] == 0.55 and set(saved["sampling"]) == {
        "temperature", "top_p", "top_k", "min_p", "repetition_penalty"}  # the panel's settings
    page.click("#clear")
    page.wait_for_selector("#export-file", state="hidden")

    calls = "<|tool_call_start|>[" + "f(x=1)," * 20_000 + "]<|tool_call_end|>"  # a 140 KB chat
    (tmp_path / "calls.json").write_text(json.dumps({"messages": [
        {"role": "user", "content": "Call f often"}, {"role": "assistant", "content": calls}]}))
    start = time.monotonic()
    upload(page, "#import", tmp_path / "calls.json")
    page.wait_for_selector("#chatbot :text('Tool calls (20,000): f')")
    print(f"\nImporting a chat with 20,000 tool calls: shown after {time.monotonic() - start:.1f} s")
    for name, bad, message in [("list.json", {**saved, "sampling": [0.7]}, "sampling: must be an object, not a list"),
                               ("hot.json", {**saved, "sampling": {"temperature": "hot"}},
                                "sampling.temperature: must be a number")]:
        (tmp_path / name).write_text(json.dumps(bad))
        upload(page, "#import", tmp_path / name)
        page.wait_for_selector(f":text('{message}')")  # a toast; the conversation stays as it was
    assert page.locator("[data-testid=user]").all_inner_texts() == ["Call f often"]

    saved["system"], saved["messages"] = "Imported system.", [
        {"role": "user", "content": "Imported question"}, {"role": "assistant", "content": "Imported answer"}]
    (tmp_path / "chat.json").write_text(json.dumps(saved))
    upload(page, "#import", tmp_path / "chat.json")
    page.wait_for_selector("[data-testid=user] :text('Imported question')")
    assert page.input_value("#system textarea") == "Imported system."

    (tmp_path / "bad.json").write_bytes(b"\x00\x01 not a conversation")
    upload(page, "#import", tmp_path / "bad.json")
    page.wait_for_selector(":text('looks binary')")  # an error toast; the app goes on
    assert page.locator("[data-testid=user]").count() == 1


def test_editing_an_earlier_message_rewinds_the_conversation(page):
    send(page, "A follow-up", 20)  # after the imported conversation of the previous test
    follow = wait_for_stats(page)
    assert page.locator("[data-testid=user]").all_inner_texts() == ["Imported question", "A follow-up"]
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    page.fill("#chatbot textarea", "Edited question")
    page.locator("#chatbot button[aria-label='Submit']").click()
    edited = wait_for_stats(page, follow["at"])
    page.wait_for_selector(":text('Editing message 1 replaced the 3 later messages.')")  # said, with the hint shown
    assert "turns after it are replaced" in page.inner_text("#edit-hint")
    assert page.locator("[data-testid=user]").all_inner_texts() == ["Edited question"]
    assert "20 tokens" in edited["text"]


def test_extraction_preset_gives_json_then_highlights_and_a_table(page, screenshots):
    page.get_by_role("tab", name="Extract").click()
    page.click("#preset input")
    page.get_by_role("option", name="invoice").click()
    page.wait_for_function("() => document.querySelector('#source textarea').value.includes('NORTHWIND')")
    page.click("#extract-run")
    page.wait_for_selector("#extract-status :text('valid')")
    assert "invoice_number" in page.inner_text("#result-json")

    page.click("#preset input")
    page.get_by_role("option", name="job_posting").click()
    page.wait_for_function("() => document.querySelector('#source textarea').value.includes('Kestrel')")
    page.click("#schema .cm-content")
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(json.dumps(GROUNDED_SCHEMA, indent=2))
    page.wait_for_selector("#schema-status :text('Schema is valid')")
    page.click("#extract-run")
    page.wait_for_selector(r"#extract-status :text-matches('([1-9]\\d*)/\\1 string values found')")  # all of them
    result = page.inner_text("#result-json")
    assert "Kestrel Analytics" in result and "hybrid" in result
    marked = {t.strip() for t in page.locator("#grounded mark").all_inner_texts()}
    source = page.inner_text("#grounded .source")  # as written: no word cut, blank lines kept
    assert source.split() == page.input_value("#source textarea").split() and "\n\n" in source
    assert {"Kestrel Analytics", "Amsterdam", "full-time", "hybrid"} <= marked
    assert "Python" in page.inner_text("#array-table") or "Airflow" in page.inner_text("#array-table")
    page.screenshot(path=str(screenshots / "extract.png"), full_page=True)


def test_batch_extraction_and_bad_uploads(page, tmp_path):
    for i, city in enumerate(["Lisbon", "Porto"]):
        (tmp_path / f"doc{i}.txt").write_text(f"Kestrel Analytics is hiring in {city}: full-time, hybrid.")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    page.set_input_files("#upload input[type=file]", str(tmp_path / "image.txt"))
    page.wait_for_selector(":text('image.txt looks binary')")

    page.click("#batch button")  # open the accordion
    page.set_input_files("#batch-files input[type=file]", [str(tmp_path / n) for n in ("doc0.txt", "doc1.txt", "image.txt")])
    page.click("#batch-run")
    page.wait_for_selector("#batch-status :text('2 of 3 files gave valid JSON')")
    table = page.inner_text("#batch-table")
    assert "doc0.txt" in table and "doc1.txt" in table and "looks binary" in table


def test_an_extraction_shows_its_progress_and_stop_frees_the_engine_at_once(page):
    page.fill("#source textarea", LONG_DOCUMENT)  # a dozen chunks: minutes of work on the demo model
    page.click("#extract-run")
    page.wait_for_selector(r"#extract-status :text-matches('Extracting… [\\d,]+ tokens · [\\d.]+ tok/s')",
                           timeout=120_000)
    page.click("#extract-stop")
    stopped = time.monotonic()
    assert wait_until_idle(_APP["url"], timeout=5) + (time.monotonic() - stopped) < 1.0  # its rows have left
    page.wait_for_selector(r"#extract-status :text-matches('Stopped after [\\d,]+ tokens')")


def test_a_small_budget_is_reported_and_an_edited_schema_marks_the_old_result(page):
    page.reload(wait_until="domcontentloaded")
    page.get_by_role("tab", name="Extract").click()
    page.fill("#source textarea", "Some notes about the meeting.")
    page.click("#schema .cm-content")
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(json.dumps({"type": "object", "properties": {"notes": {"type": "string"}},
                                          "required": ["notes"]}))
    # the preset no longer names this schema
    page.wait_for_function("() => document.querySelector('#preset input').value === ''")
    page.wait_for_selector("#schema-status :text('Schema is valid')")
    page.fill("#extract-max-tokens input", "24")
    page.click("#extract-run")
    page.wait_for_selector("#extract-status :text('closed early by the 24-token budget')")
    page.click("#schema .cm-content")
    page.keyboard.press("Control+A")
    page.keyboard.insert_text("{oops")
    page.wait_for_selector("#schema-status :text('✗')")
    page.wait_for_selector("#extract-status :text('the result below is from the previous one')")


def test_stop_ends_a_batch_and_keeps_what_finished(page, tmp_path):
    names = [f"short{i}.txt" for i in range(3)]
    for name in names:
        (tmp_path / name).write_text("Kestrel Analytics is hiring in Lisbon: full-time, hybrid.")
    (tmp_path / "long.txt").write_text(LONG_DOCUMENT)
    page.reload(wait_until="domcontentloaded")  # a new session, without the previous test's batch files
    page.get_by_role("tab", name="Extract").click()
    page.click("#batch button")
    page.set_input_files("#batch-files input[type=file]", [str(tmp_path / n) for n in (*names, "long.txt")])
    page.click("#batch-run")
    page.wait_for_selector("#batch-status :text('3 of 4 files done')")
    page.click("#batch-stop")
    page.wait_for_selector("#batch-status :text('Stopped: 3 of 4 files finished.')")
    table = page.inner_text("#batch-table")
    assert all(name in table for name in names) and "long.txt" not in table
    link = page.wait_for_selector("#batch-downloads a[href*='batch.jsonl']")
    lines = page.request.get(link.get_attribute("href")).text().splitlines()
    assert sorted(json.loads(line)["source"] for line in lines) == names
    assert wait_until_idle(_APP["url"], timeout=5) < 5


def test_the_model_tab_loads_another_model_and_chat_runs_on_it(page, tiny_checkpoint, tmp_path):
    def load(name: str, outcome: str) -> None:
        page.get_by_role("tab", name="Model").click()
        page.fill("#model-name textarea", name)
        page.click("#model-load")
        page.wait_for_selector(f"#model-status :text('{outcome}')", timeout=180_000)

    load(str(tiny_checkpoint), "✓ Loaded")
    # The panel comes in the same update as the status line, but the page may render it a moment later.
    page.wait_for_function("(path) => document.querySelector('#model-panel').innerText.includes(path)",
                           arg=str(tiny_checkpoint))
    assert str(tiny_checkpoint) in page.inner_text("#model-panel") and not page.is_visible("#demo-banner")
    page.get_by_role("tab", name="Chat").click()
    before = page.evaluate(f"""() => {{
        const s = ({LAST_BOT})()?.querySelector('.reply-stats');
        return s ? Date.parse(s.title.replace('finished at ', '')) / 1000 : 0; }}""")
    send(page, "Hello there", 5)
    assert "5 tokens" in wait_for_stats(page, before)["text"]
    assert page.locator("[data-testid=user]").all_inner_texts() == ["Hello there"]  # a new conversation

    load(str(tmp_path / "no-such-model"), "✗ Could not load")
    assert str(tiny_checkpoint) in page.inner_text("#model-panel")  # the loaded model stays
    load("demo", "✓ Loaded demo")
    page.wait_for_selector("#demo-banner", state="visible")


def test_the_app_log_holds_no_traceback(page):
    """After every refusal the page tests caused: one line at most in the log, never a traceback."""
    log = Path(_APP["log"]).read_text()
    assert "Traceback" not in log, log[-5000:]
