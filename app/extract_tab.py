"""The Extract tab: a schema (a preset or your own) and a text give JSON, shown with the source's
values highlighted, arrays as tables and downloads; a batch runs many files. Each extraction is rows of
the shared engine, with live progress and a Stop button."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from lfm_mlx.constrain import BudgetError, SchemaError, schema_report
from lfm_mlx.engine import Cancelled
from lfm_mlx.extract import DEFAULT_MAX_TOKENS as DEFAULT_EXTRACT_TOKENS
from lfm_mlx.extract import extract_many

from .inputs import (FREE, MAX_DOCUMENT_CHARS, PRIVATE, TEXT_TYPES, check_document, check_instructions,
                     as_sentence, extraction_budget, parse_schema, read_upload, refuse, soft)
from .runtime import MAX_REPLY_TOKENS, Runtime
from .sessions import Sessions

SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "assets" / "schemas"
BATCH_HEADERS = ["file", "result", "data / error"]
HIGHLIGHT_COLOURS = ("#fde68a", "#bbf7d0", "#bfdbfe", "#fbcfe8", "#ddd6fe", "#fed7aa", "#a5f3fc", "#e9d5ff")


class Progress:
    """Tokens an extraction has generated so far and their rate: its live status line."""

    def __init__(self) -> None:
        self.tokens = 0
        self.first: Optional[float] = None

    def results(self, batch: list) -> list[tuple[int, Any]]:
        """Count the batch's token counts; return its (index, Extraction) pairs."""
        for item in batch:
            if isinstance(item, int):
                self.first = self.first or time.monotonic()
                self.tokens += item
        return [item for item in batch if isinstance(item, tuple)]

    def __str__(self) -> str:
        if not self.tokens:
            return "reading the text"
        seconds = time.monotonic() - self.first
        return f"{self.tokens:,} tokens" + (f" · {self.tokens / seconds:.1f} tok/s" if seconds > 0.5 else "")


def load_presets() -> dict[str, dict]:
    """assets/schemas/NAME.json (a JSON Schema) with its sample text NAME.txt, by name."""
    presets = {}
    for path in sorted(SCHEMAS_DIR.glob("*.json")):
        sample = path.with_suffix(".txt")
        presets[path.stem] = dict(schema=json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2,
                                                    ensure_ascii=False),
                                  sample=sample.read_text(encoding="utf-8") if sample.is_file() else "")
    return presets


def highlights(text: str, spans: dict) -> list[tuple[str, Optional[str]]]:
    """The source cut into (text, label) pieces; labels are JSON paths without indices."""
    marks = sorted((s[0], s[1], _label(p)) for p, s in spans.items() if s)
    out, pos = [], 0
    for start, end, label in marks:
        if start < pos:
            continue  # overlaps the previous highlight
        out += [(text[pos:start], None), (text[start:end], label)]
        pos = end
    out.append((text[pos:], None))
    return [piece for piece in out if piece[0]]


def highlighted_html(text: str, spans: dict) -> str:
    """The source exactly as written (line breaks, blank lines, whole words), each found value marked
    with its field's colour and path, and a legend of the fields. Gradio's HighlightedText lays pieces out
    as boxes, which breaks words and drops blank lines."""
    pieces = highlights(text, spans)
    labels = list(dict.fromkeys(label for _, label in pieces if label))
    colour = {label: HIGHLIGHT_COLOURS[i % len(HIGHLIGHT_COLOURS)] for i, label in enumerate(labels)}
    body = "".join(html.escape(piece) if label is None else
                   f'<mark style="background:{colour[label]}" title="{html.escape(label)}">{html.escape(piece)}</mark>'
                   for piece, label in pieces)
    legend = "".join(f'<span class="field" style="background:{colour[label]}">{html.escape(label)}</span>'
                     for label in labels) or '<span class="none">no extracted value found in the source</span>'
    return f'<div class="legend">{legend}</div><div class="source">{body}</div>'


def _label(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path).removeprefix("$.")


def array_fields(data: Any, path: str = "") -> dict[str, list]:
    """Every array in the result (nested too), by path: what the table view can show."""
    found = {}
    if isinstance(data, dict):
        for k, v in data.items():
            found.update(array_fields(v, f"{path}.{k}" if path else k))
    elif isinstance(data, list):
        found[path or "(root)"] = data
    return found


def table(rows: list) -> list[list]:
    if rows and all(isinstance(r, dict) for r in rows):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
    return [["value" if rows else "(no items)"]] + [[_cell(r)] for r in rows]


def _cell(v: Any) -> str:
    return "" if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def write_downloads(name: str, records: list[tuple[str, Any]]) -> list[str]:
    """JSON, JSONL and CSV files of (source name, data) records, in a fresh temporary directory."""
    folder = Path(tempfile.mkdtemp(prefix="lfm-mlx-extract-"))
    single = len(records) == 1
    (folder / f"{name}.json").write_text(json.dumps(records[0][1] if single else dict(records), indent=2,
                                                    ensure_ascii=False), encoding="utf-8")
    (folder / f"{name}.jsonl").write_text("".join(json.dumps({"source": s, "data": d}, ensure_ascii=False) + "\n"
                                                  for s, d in records), encoding="utf-8")
    keys = list(dict.fromkeys(k for _, d in records if isinstance(d, dict) for k in d))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["source", *keys])
    for s, d in records:
        writer.writerow([s, *(_cell(d.get(k)) if isinstance(d, dict) else "" for k in keys)])
    (folder / f"{name}.csv").write_text(buffer.getvalue(), encoding="utf-8")
    return [str(folder / f"{name}.{ext}") for ext in ("json", "jsonl", "csv")]


def check(schema_text: str) -> str:
    """The status line under the schema: refused, or what the grammar enforces and what is only
    checked after generation."""
    try:
        return schema_report(parse_schema(schema_text)).summary()
    except gr.Error as e:
        return f"✗ {e.message}"


def extraction(runtime: Runtime, texts: list[str], schema: dict, instructions: Optional[str], max_tokens: int,
               cancel: threading.Event) -> Iterator[list]:
    """``extract_many`` as rows of the engine, beside chats: batches of (index, result) as texts
    finish and of token counts as they are generated (``Progress`` tells them apart), ``[]`` as
    a heartbeat. Closing it, or setting ``cancel``, ends its rows within a step
    (then ``Cancelled`` is raised if it is still being read). A text the library cannot read (a
    lone surrogate, say) gives a failed result, not an exception; a budget below the schema's shortest
    document, or a schema that leaves no room in the context, is refused with the fix."""
    def produce(emit: Callable) -> None:
        extract_many(runtime.model, runtime.tokenizer, texts, schema, instructions=instructions,
                     max_tokens=max_tokens, progress=False, engine=runtime.engine, cancel=cancel,
                     on_result=lambda i, result: emit((i, result)), on_tokens=emit)
    try:
        yield from runtime.stream(produce, cancel)
    except BudgetError as e:
        raise refuse(f"Max tokens ({max_tokens:,}) is too small for this schema: its shortest complete JSON takes "
                     f"{e.minimum:,} tokens. Raise Max tokens to at least {e.minimum:,}.") from None
    except SchemaError as e:
        raise refuse(as_sentence(e)) from None


def extract_tab(runtime: Runtime, sessions: Sessions, model_event: dict) -> None:
    """Build the tab (inside the page's ``gr.Tabs``) and its handlers."""
    presets = load_presets()
    first = next(iter(presets), None)
    with gr.Tab("Extract", id="extract"):
        with gr.Row(equal_height=False):
            with gr.Column():
                preset = gr.Dropdown(list(presets), value=first, label="Preset (schema + sample text)",
                                     elem_id="preset")
                source = gr.Textbox(label="Source text", lines=14, max_lines=24, elem_id="source",
                                    value=presets[first]["sample"] if first else "")
                upload = gr.File(label=f"…or upload a text file (.txt .md .json .csv, up to {MAX_DOCUMENT_CHARS:,} "
                                       "characters)",
                                 file_types=TEXT_TYPES, height=130, elem_id="upload")
            with gr.Column():
                schema = gr.Code(value=presets[first]["schema"] if first else "", language="json",
                                 label="JSON Schema", lines=16, max_lines=24, elem_id="schema")
                schema_status = gr.Markdown(check(presets[first]["schema"]) if first else "", elem_id="schema-status")
                with gr.Row():
                    instructions = gr.Textbox(label="Instructions (optional)", lines=1, scale=3)
                    extract_tokens = gr.Number(value=DEFAULT_EXTRACT_TOKENS, precision=0, minimum=1,
                                               maximum=MAX_REPLY_TOKENS, scale=1, elem_id="extract-max-tokens",
                                               label=f"Max tokens per chunk (up to {MAX_REPLY_TOKENS:,})")
                with gr.Row():
                    extract_btn = gr.Button("Extract", variant="primary", scale=3, elem_id="extract-run")
                    extract_stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="extract-stop")
        extract_status = gr.Markdown(elem_id="extract-status")
        with gr.Row(equal_height=False):
            result_json = gr.JSON(label="Extracted JSON", elem_id="result-json", height=420)
            with gr.Column():
                gr.Markdown("**Source with extracted values highlighted**")
                grounded = gr.HTML(elem_id="grounded")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                array_pick = gr.Dropdown([], label="Array field", interactive=True)
                array_table = gr.Dataframe(label="Array as a table", wrap=True, interactive=False, elem_id="array-table",
                                           headers=["(extract to see the arrays)"], value=[])
            downloads = gr.File(label="Downloads (JSON, JSONL, CSV)", file_count="multiple", scale=1)
        last_result = gr.State(None)
        with gr.Accordion("Batch: extract from several files", open=False, elem_id="batch"):
            batch_files = gr.File(label="Text files", file_count="multiple", file_types=TEXT_TYPES, elem_id="batch-files")
            with gr.Row():
                batch_btn = gr.Button("Extract from all files", variant="primary", scale=3, elem_id="batch-run")
                batch_stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="batch-stop")
            batch_status = gr.Markdown(elem_id="batch-status")
            batch_table = gr.Dataframe(label="Results", wrap=True, interactive=False, elem_id="batch-table",
                                       headers=BATCH_HEADERS, value=[])
            batch_downloads = gr.File(label="Batch downloads (JSON, JSONL, CSV)", file_count="multiple",
                                      elem_id="batch-downloads")

    def cancel_event(request: gr.Request, kind: str) -> threading.Event:
        """A new cancel event for this session's extraction of ``kind``, which its Stop button sets."""
        event = threading.Event()
        sessions.get(request).extractions[kind] = event
        return event

    def stopper(kind: str) -> Callable:
        def stop_extraction(request: gr.Request):
            event = sessions.get(request).extractions.get(kind)
            if event is not None:
                event.set()
        return stop_extraction

    def schema_edited(schema_text: str, preset_name: Optional[str], result: Any):
        """Check the schema; a preset whose schema this no longer is is unselected, and a result
        shown for another schema says so."""
        stale = "The schema changed: the result below is from the previous one. Extract again to update it."
        return (check(schema_text),
                gr.skip() if preset_name in presets and presets[preset_name]["schema"] == schema_text
                else gr.Dropdown(value=None),
                stale if result is not None else gr.skip())

    def pick_preset(name: str):
        p = presets.get(name)
        if p is None:
            return gr.skip(), gr.skip(), gr.skip()
        return p["schema"], p["sample"], check(p["schema"])

    @soft(1)
    def read_source(file):
        return check_document(read_upload(file, "source file"), Path(file).name) if file else gr.skip()

    @soft(7)
    def run_extract(request: gr.Request, text: str, schema_text: str, instructions_text: str, max_tokens):
        parsed, text = parse_schema(schema_text), check_document(text)
        instructions, limit = check_instructions(instructions_text), extraction_budget(max_tokens)
        cancel = cancel_event(request, "extract")
        unchanged = (gr.skip(),) * 6
        progress, result = Progress(), None
        yield ("⏳ Extracting… reading the text", *unchanged)
        try:
            for batch in extraction(runtime, [text], parsed, instructions, limit, cancel):
                for _, result in progress.results(batch):
                    pass
                yield (gr.skip() if result else f"⏳ Extracting… {progress}", *unchanged)
        except Cancelled:
            yield (f"Stopped after {progress}.", *unchanged)
            return
        finally:  # the client left, or the run ended: either way its rows leave the engine
            cancel.set()
        arrays = array_fields(result.data)
        s = result.stats
        found = sum(1 for span in result.spans.values() if span)
        status = (f"{'✓ valid' if result.valid else '✗ ' + (result.error or 'invalid')} · "
                  f"{found}/{len(result.spans)} string values found in the source · {s.generation_tokens} tokens · "
                  f"{s.generation_tps:.1f} tok/s · TTFT {s.ttft_s * 1000:.0f} ms"
                  + (f" · long text: {result.chunks} chunks merged" if result.chunked else "")
                  + (f" · ⚠ closed early by the {limit:,}-token budget: raise Max tokens for a fuller result"
                     if result.closed_by_budget else ""))
        pick = next(iter(arrays), None)
        rows = table(arrays[pick]) if pick else [["(no array in the result)"]]
        yield (status, result.data, highlighted_html(text, result.spans),
               gr.Dropdown(choices=list(arrays), value=pick), gr.Dataframe(value=rows[1:], headers=rows[0]),
               write_downloads("extraction", [("source", result.data)]), result.data)

    def show_array(name: str, data: Any):
        rows = table(array_fields(data).get(name, [])) if name else [["(no array in the result)"]]
        return gr.Dataframe(value=rows[1:], headers=rows[0])

    @soft(3)
    def run_batch(request: gr.Request, files, schema_text: str, instructions_text: str, max_tokens):
        parsed, instructions = parse_schema(schema_text), check_instructions(instructions_text)
        limit = extraction_budget(max_tokens)
        if not files:
            raise refuse("Upload one or more text files first.")
        names, texts, skipped = [], [], []
        for f in files:
            name = Path(f).name
            try:
                texts.append(check_document(read_upload(f), name))
                names.append(name)
            except gr.Error as e:
                skipped.append([name, "skipped", e.message])
        results: dict = {}  # index in texts → Extraction, as each finishes

        def results_table():
            rows = [[names[i], ("valid" if r.valid else "invalid") + (" (closed by the budget)" if r.closed_by_budget
                                                                     else ""),
                     r.error or json.dumps(r.data, ensure_ascii=False)[:200]] for i, r in sorted(results.items())]
            return gr.Dataframe(value=rows + skipped, headers=BATCH_HEADERS)

        cancel = cancel_event(request, "batch")
        progress = Progress()
        yield f"⏳ Extracting from {len(texts)} files…", results_table(), None
        try:
            for batch in extraction(runtime, texts, parsed, instructions, limit, cancel):
                finished = progress.results(batch)
                results.update(finished)
                yield (f"⏳ {len(results)} of {len(texts)} files done · {progress}…",
                       results_table() if finished else gr.skip(), gr.skip())
            status = f"{sum(r.valid for r in results.values())} of {len(files)} files gave valid JSON."
        except Cancelled:  # what finished before Stop is kept, shown and downloadable
            status = f"Stopped: {len(results)} of {len(texts)} files finished."
        finally:
            cancel.set()
        records = [(names[i], r.data) for i, r in sorted(results.items())]
        yield status, results_table(), write_downloads("batch", records) if records else None

    preset.change(pick_preset, preset, [schema, source, schema_status], queue=False, **PRIVATE)
    schema.change(schema_edited, [schema, preset, last_result], [schema_status, preset, extract_status], queue=False,
                  trigger_mode="always_last", **PRIVATE)
    upload.upload(read_source, upload, source, **FREE, **PRIVATE)
    extract_btn.click(run_extract, [source, schema, instructions, extract_tokens],
                      [extract_status, result_json, grounded, array_pick, array_table, downloads, last_result],
                      **model_event, **PRIVATE)
    extract_stop_btn.click(stopper("extract"), None, None, queue=False, **PRIVATE)
    array_pick.change(show_array, [array_pick, last_result], array_table, queue=False, **PRIVATE)
    batch_btn.click(run_batch, [batch_files, schema, instructions, extract_tokens],
                    [batch_status, batch_table, batch_downloads],
                    **model_event, **PRIVATE)
    batch_stop_btn.click(stopper("batch"), None, None, queue=False, **PRIVATE)
