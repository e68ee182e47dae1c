"""Which model the app, the server and the CLIs run.

``resolve_model`` picks: a local directory as is; a hub id from its cached 4-bit conversion, else
downloaded and converted once; the demo model when asked for, or when the default model cannot be
downloaded and nothing is cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .demo import cache_root, ensure_demo, is_demo

DEFAULT_MODEL = "LiquidAI/LFM2.5-350M"


@dataclass
class ModelChoice:
    path: Path
    name: str  # what the user asked for (hub id or directory), or "demo"
    demo: bool = False
    note: str = ""  # why this model, for the terminal and the UI banner


def converted_dir(hub_id: str, bits: int = 4) -> Path:
    return cache_root() / f"{hub_id}-{bits}bit"


def resolve_model(model: Optional[str] = None, demo: bool = False, log: Callable[[str], None] = print) -> ModelChoice:
    """Local directory → itself. Hub id → its cached 4-bit conversion, else download + convert + cache.
    The default model falls back to the demo when the hub cannot be reached and nothing is cached;
    a model asked for by name raises instead (ConnectionError, FileNotFoundError)."""
    from .loading import get_model_path

    if demo:
        return ModelChoice(ensure_demo(), "demo", True, "demo model requested (--demo)")
    name = model or DEFAULT_MODEL
    local = Path(name).expanduser()
    if local.is_dir():
        return ModelChoice(local, name, is_demo(local))
    cached = converted_dir(name)
    if (cached / "config.json").is_file():
        return ModelChoice(cached, name, note=f"using the converted model cached in {cached}")
    try:
        if name.count("/") == 1 and not name.startswith((".", "/", "~")):
            log(f"Downloading {name} from the Hugging Face hub…")
        source = get_model_path(name)
    except ConnectionError as e:
        if model is not None:
            raise
        log(f"{e}\nStarting on the demo model instead: random weights, for trying the app only.")
        return ModelChoice(ensure_demo(), "demo", True, f"{name} could not be downloaded (offline?) and is not cached")
    config = json.loads((source / "config.json").read_text())
    if config.get("quantization"):
        return ModelChoice(source, name, note="already quantized: loaded as downloaded")
    try:
        from .convert import convert
    except ImportError:
        return ModelChoice(source, name, note="converter unavailable: running the original weights")
    log(f"Converting {name} to MLX 4-bit in {cached} (once)…")
    log(convert(source, cached, quantize=True, q_bits=4).summary())
    return ModelChoice(cached, name, note=f"converted to 4-bit and cached in {cached}")
