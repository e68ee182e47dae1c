"""The README's Python and curl snippets run as written, in order, against a local checkpoint (the hub id
replaced by its path) and a server started here (its port replaced)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from lfm_mlx.bench_serve import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "LiquidAI/LFM2.5-350M"
README_URL = "http://127.0.0.1:8080"


def snippets(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.M | re.S)


def test_the_readme_snippets_run_as_written(tiny_checkpoint, tmp_path):
    python = snippets("python")
    curls = [s for s in snippets("bash") if s.startswith("curl ")]
    assert len(python) >= 5 and len(curls) == 1 and sum(README_URL in s for s in python) == 1

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "lfm_mlx.server", "--model", str(tiny_checkpoint),
                                   "--port", str(port), "--max-tokens", "256"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_healthy(server, url, log, "lfm_mlx.server", timeout=120)
        script = "\n\n".join(python).replace(HUB_ID, str(tiny_checkpoint)).replace(README_URL, url)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as `pip install -e .` would make it importable
        run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        assert (tmp_path / "chat.json").is_file()  # ChatSession.save wrote where the snippet said

        reply = subprocess.run(["bash", "-c", curls[0].replace(README_URL, url)], capture_output=True, text=True,
                               timeout=300)
        assert reply.returncode == 0, reply.stderr
        content = json.loads(reply.stdout)["choices"][0]["message"]["content"]
        invoice = json.loads(content, parse_int=float)  # a random model may write a thousand-digit total
        assert isinstance(invoice["vendor"], str) and isinstance(invoice["total"], (int, float))
    finally:
        server.terminate()
        server.wait(30)
