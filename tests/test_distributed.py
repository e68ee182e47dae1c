"""Batch extraction over two ranks started by `mlx.launch` (ring backend on 127.0.0.1): the same output as
one process, and a run that loses a rank resumes to every record exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfm_mlx.distributed import World, run_rounds

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
SCHEMA = {"type": "object", "required": ["shop", "total"],
          "properties": {"shop": {"type": "string"}, "total": {"type": "number"}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def job(tmp_path, tiny_checkpoint):
    """40 records (and one malformed line), a schema, and the command line for them."""
    if not LAUNCH.exists() and not shutil.which("mlx.launch"):
        pytest.skip("mlx.launch is not installed beside this Python")
    lines = [json.dumps({"id": f"r{i}", "text": f"Invoice {i} from Shop {i}, total {3 * i} EUR."}) for i in range(40)]
    lines.insert(17, '{"id": "broken", ')
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA), encoding="utf-8")

    def args(output: str) -> list[str]:
        return ["--schema", str(tmp_path / "s.json"), "--input", str(tmp_path / "docs.jsonl"),
                "--output", str(tmp_path / output), "--model", str(tiny_checkpoint), "--max-tokens", "48",
                "--batch-size", "2"]
    return tmp_path, args


def launch(args: list[str]) -> list[str]:
    return [str(LAUNCH if LAUNCH.exists() else shutil.which("mlx.launch")), "-n", "2", "--backend", "ring",
            "--starting-port", str(free_port()), "--python", sys.executable, "--cwd", str(ROOT),
            "-m", "lfm_mlx.extract", *args]


def alone(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm_mlx.extract", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def rows(path: Path) -> list[dict]:
    """The output's rows without their timings."""
    return [{k: v for k, v in json.loads(line).items() if k != "stats"}
            for line in path.read_text(encoding="utf-8").splitlines()]


def test_two_ranks_write_what_one_process_writes(job):
    tmp_path, args = job
    assert alone(args("one.jsonl")).returncode == 0
    run = subprocess.run(launch(args("two.jsonl")), capture_output=True, text=True, timeout=300)
    assert "[rank 0] 41 records: 40 valid, 1 with errors" in run.stderr, run.stderr[-2000:]
    two, one = rows(tmp_path / "two.jsonl"), rows(tmp_path / "one.jsonl")
    assert two == one and len(one) == 41 and one[17]["error"].startswith("line 18: not valid JSON")
    assert not (tmp_path / "two.jsonl.journal").exists()


def rank_pids(marker: str, rank: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_text() and f"MLX_RANK={rank}\0" in (proc / "environ").read_text():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_lost_rank_stops_the_run_and_resume_completes_every_record_once(job):
    tmp_path, args = job
    assert alone(args("one.jsonl")).returncode == 0
    journal = tmp_path / "two.jsonl.journal"
    proc = subprocess.Popen(launch(args("two.jsonl")), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 4):
        time.sleep(0.2)
    victims = rank_pids("two.jsonl", 1)
    assert victims and proc.poll() is None
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    # mlx.launch names the lost rank; rank 0 says what each rank held if it gets to (a SIGTERM from the
    # launcher may end it first): either way every finished row is in the journal, or the saved output.
    assert "Node with rank 1 exited" in out, out[-2000:]
    kept = rows(tmp_path / "two.jsonl") if (tmp_path / "two.jsonl").exists() else []
    assert 0 < len(kept) + len(journal.read_text().splitlines()) < 41 + len(kept)

    run = subprocess.run(launch(args("two.jsonl") + ["--resume"]), capture_output=True, text=True, timeout=300)
    assert "resuming:" in run.stderr and "41 records: 40 valid" in run.stderr, run.stderr[-2000:]
    assert rows(tmp_path / "two.jsonl") == rows(tmp_path / "one.jsonl")  # every record once, in input order
    assert not journal.exists()


def test_a_world_of_one_runs_the_same_rounds():
    seen = []
    run_rounds(World(), lambda chunk, emit: [emit(i, {"n": len(text)}) for i, text in chunk],
               [(0, "a"), (1, "bb"), (2, "ccc")], on_row=lambda i, row: seen.append((i, row["n"])), chunk=2)
    assert seen == [(0, 1), (1, 2), (2, 3)]
