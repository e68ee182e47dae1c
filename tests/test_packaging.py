"""The project installs as a package: the library, the app, the schema presets and the commands work from
any folder, with requirements.txt as the one list of dependencies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "convert.py", "lfm_mlx", "app", "assets/schemas",
           "assets/expected")
COMMANDS = {"lfm-mlx-app", "lfm-mlx-server", "lfm-mlx-extract", "lfm-mlx-convert"}


def test_the_wheel_works_from_another_folder(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", tmp_path / "dist", f"{source}/"], check=True)
    wheel = next((tmp_path / "dist").glob("lfm_mlx-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert {line.split("=")[0].strip() for line in entry_points.splitlines() if "=" in line} == COMMANDS
    required = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert all(f"Requires-Dist: {r.split(';')[0].strip()}" in metadata for r in required if r)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = ("import lfm_mlx, convert, app.__main__ as m; from lfm_mlx.extract import SCHEMAS_DIR; "
             "assert SCHEMAS_DIR.is_relative_to(r'%s'), SCHEMAS_DIR; assert (SCHEMAS_DIR / 'invoice.json').is_file(); "
             "assert m.STYLE.is_file(); from lfm_mlx.bench_extraction import EXPECTED; "
             "assert (EXPECTED / 'invoice.json').is_file(); print(lfm_mlx.__file__)" % site)
    out = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(str(site)), out.stderr
    usage = subprocess.run([site / "bin" / "lfm-mlx-extract", "--help"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    assert usage.returncode == 0 and "--schema" in usage.stdout, usage.stderr
