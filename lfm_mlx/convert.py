"""Convert an LFM2 / LFM2.5 checkpoint into an MLX directory (quantized or float) in mlx-lm's layout.

Weights load lazily (``mx.load`` reads a safetensors tensor only when it is first used) and are
quantized one layer at a time, so the float model is never whole in memory. Everything that can be
checked is checked before anything is written; the result is built in a temporary directory beside the
destination and renamed into place only when complete, so a failed or terminated (SIGTERM) run leaves no
trace, and the folders of a killed one (kill -9, power loss) are repaired or removed by the next run.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten
from mlx_lm.utils import compute_bits_per_weight, dequantize_model, save_config, save_model

from .config import load_config
from .loading import (
    DTYPES,
    describe_tensors,
    get_model_path,
    load_model,
    load_weights,
    nonfinite_tensors,
    recover_interrupted_write,
    weight_files,
    write_folder,
    write_token,
)

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64
# Mixed precision: (bits of the other linear layers, bits of the embedding). LFM2 ties the output head
# to the embedding, so one matrix both reads every token in and scores every token out.
RECIPES = {"mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}
HIGH_PRECISION = ("model.embed_tokens", "lm_head")
SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
              "generation_config.json")
ERROR_ROW_STRIDE = 8
PROMPT = "The capital of France is"
PROMPT_IDS_WITHOUT_TOKENIZER = list(range(1, 9))


class ConversionError(ValueError):
    """Options, paths or weights that cannot make a conversion; raised before anything is written."""


class _Terminated(BaseException):
    """SIGTERM, raised where the conversion stands so that its temporary directory is removed."""


@dataclass
class QuantizedTensor:
    """How far a quantized weight is from its float source: max |Δ| / max |w| and mean |Δ| / mean |w|,
    measured on every ``ERROR_ROW_STRIDE``-th row (groups run along rows, so the sample is exact)."""

    name: str
    bits: int
    group_size: int
    max_rel_error: float
    mean_rel_error: float


@dataclass
class ConversionReport:
    source: str
    mlx_path: str
    dtype: str
    bits: Optional[int]  # None: float weights
    group_size: Optional[int]
    recipe: Optional[str]
    source_bytes: int
    output_bytes: int
    bits_per_weight: float
    tensors: list[QuantizedTensor] = field(default_factory=list)
    top1_agreement: Optional[float] = None  # converted vs source model on PROMPT, float32 logits
    kl: Optional[float] = None  # mean KL(source || converted) per position, nats
    prompt_tokens: int = 0
    seconds: float = 0.0
    peak_memory: int = 0  # mx.get_peak_memory(), bytes
    max_rss: int = 0  # the process's, bytes

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        mb = 1e6
        if self.bits is None:
            layout = f"float weights ({self.dtype})"
        elif self.recipe:
            low, high = RECIPES[self.recipe]
            layout = f"{self.recipe}: {low}-bit, embedding {high}-bit, group size {self.group_size}"
        else:
            layout = f"{self.bits}-bit affine, group size {self.group_size}"
        lines = [
            f"source        {self.source}: {self.source_bytes / mb:.1f} MB of weights",
            f"output        {self.mlx_path}: {self.output_bytes / mb:.1f} MB "
            f"({self.output_bytes / self.source_bytes:.2f}x), {layout}",
            f"bits/weight   {self.bits_per_weight:.3f}",
        ]
        if self.tensors:
            worst = max(self.tensors, key=lambda t: t.max_rel_error)
            mean = sum(t.mean_rel_error for t in self.tensors) / len(self.tensors)
            lines.append(
                f"tensor error  {len(self.tensors)} quantized tensors: mean relative error {mean:.4f}; "
                f"worst max relative error {worst.max_rel_error:.4f} ({worst.name})"
            )
        if self.kl is not None:
            lines.append(
                f"agreement     top-1 {self.top1_agreement:.1%} over {self.prompt_tokens} positions, "
                f"KL {self.kl:.4g} nats/token (vs the source, float32 logits)"
            )
        lines.append(
            f"cost          {self.seconds:.1f} s, peak MLX memory {self.peak_memory / mb:.0f} MB, "
            f"process max RSS {self.max_rss / mb:.0f} MB"
        )
        return "\n".join(lines)


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    quantize: bool = True,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    quant_recipe: Optional[str] = None,
    dtype: Optional[str] = None,
    dequantize: bool = False,
    force: bool = False,
    revision: Optional[str] = None,
) -> ConversionReport:
    """Write ``hf_path`` (a directory or hub id) to ``mlx_path``: quantized (4-bit, group size 64 unless
    told otherwise), float in ``dtype`` with ``quantize=False``, or float again from an MLX-quantized
    source with ``dequantize=True``. ``dtype`` (float parameters, scales) defaults to config.json's."""
    start = time.perf_counter()
    mx.reset_peak_memory()
    quantize = quantize and not dequantize
    bits, group_size = _check_options(quantize, q_bits, q_group_size, quant_recipe, dtype)
    dst = _check_destination(mlx_path, force)
    src = get_model_path(hf_path, revision).resolve()
    if dst == src or dst in src.parents:
        raise ConversionError(f"{dst} holds the source checkpoint: choose another --mlx-path")
    config = load_config(src)
    if quantize and config.get("quantization"):
        raise ConversionError(
            f"{src} is already quantized: convert the original float checkpoint, or pass --dequantize"
        )
    if dequantize and not config.get("quantization"):
        raise ConversionError(f"{src} is not an MLX-quantized directory: there is nothing to dequantize")
    dtype = dtype or config.get("torch_dtype") or config.get("dtype")
    dtype = dtype if isinstance(dtype, str) and dtype in DTYPES else "bfloat16"
    # Parses config.json and every safetensors header, and checks each tensor's shape: bad input stops
    # here. The weights themselves stay on disk until used.
    model = load_model(src, dtype, lazy=True)
    bad = nonfinite_tensors(load_weights(src))
    if bad:
        raise ConversionError(
            f"{describe_tensors(bad)} of {src} holds NaN or inf values: the checkpoint is damaged; "
            "download it again, or convert another"
        )

    ids = mx.array([_prompt_ids(src)])
    reference = None
    if quantize or dequantize:
        # From a second, throwaway model: only the graph holds its weights, so evaluating the logits
        # reads each weight, uses it and frees it instead of holding the whole float model at once.
        reference = _float32_logits(load_model(src, dtype, lazy=True), ids)
        mx.eval(reference)
    tensors = []
    if quantize:
        plan = _quantization_plan(model, bits, group_size, quant_recipe)
        tensors = _quantize(model, plan)
        config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        config["quantization"].update({p: q for p, q in plan.items() if q["bits"] != bits})
    elif dequantize:
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    top1 = kl = None
    if reference is not None:
        top1, kl = _agreement(reference, _float32_logits(model, ids))
    bits_per_weight = compute_bits_per_weight(model)

    dst.parent.mkdir(parents=True, exist_ok=True)
    token = write_token()
    tmp = write_folder(dst, "tmp", token)
    with _sigterm_unwinds():
        try:
            tmp.mkdir()  # not mkdtemp: its 0700 mode would become the destination's
            save_model(tmp, model, donate_model=True)
            save_config(config, tmp / "config.json")
            for pattern in SIDE_FILES:
                for f in src.glob(pattern):
                    shutil.copyfile(f, tmp / f.name)
            report = ConversionReport(
                source=str(hf_path),
                mlx_path=str(dst),
                dtype=dtype,
                bits=bits if quantize else None,
                group_size=group_size if quantize else None,
                recipe=quant_recipe,
                source_bytes=sum(f.stat().st_size for f in weight_files(src)),
                output_bytes=sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
                bits_per_weight=bits_per_weight,
                tensors=tensors,
                top1_agreement=top1,
                kl=kl,
                prompt_tokens=ids.shape[1],
                seconds=time.perf_counter() - start,
                peak_memory=mx.get_peak_memory(),
                max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024),
            )
            (tmp / "README.md").write_text(_model_card(report, hub_id=not Path(hf_path).expanduser().exists()))
            _move_into_place(tmp, dst, write_folder(dst, "old", token))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return report


def _check_options(
    quantize: bool, q_bits: Optional[int], q_group_size: Optional[int], recipe: Optional[str], dtype: Optional[str]
) -> tuple[int, int]:
    if not quantize and (q_bits, q_group_size, recipe) != (None, None, None):
        raise ConversionError("q_bits / q_group_size / quant_recipe only apply when quantizing")
    if recipe is not None and recipe not in RECIPES:
        raise ConversionError(f"unknown quant recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    if recipe is not None and q_bits is not None:
        raise ConversionError(f"quant recipe {recipe} sets the bits itself: drop q_bits (--q-bits)")
    bits = RECIPES[recipe][0] if recipe else (DEFAULT_BITS if q_bits is None else q_bits)
    group_size = DEFAULT_GROUP_SIZE if q_group_size is None else q_group_size
    if bits not in BITS:
        raise ConversionError(f"unsupported bits {bits}: use one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise ConversionError(f"unsupported group size {group_size}: use one of {', '.join(map(str, GROUP_SIZES))}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return bits, group_size


def _check_destination(mlx_path: Union[str, Path], force: bool) -> Path:
    """Refuse, before touching anything, a destination whose overwrite would delete more than a model:
    ``""`` (which means ``.``), the current or home directory, or one holding either (``/``). Then repair
    what a killed conversion to it left behind, and check it can be written."""
    if not str(mlx_path).strip():
        raise ConversionError(
            "--mlx-path is empty, which means the current directory: name the directory to write, "
            "e.g. --mlx-path lfm2-4bit"
        )
    dst = Path(mlx_path).expanduser().resolve()
    places = {Path.cwd().resolve(): "the current directory", Path.home().resolve(): "your home directory"}
    held = [f"a directory holding {name}" for place, name in places.items() if dst in place.parents]
    what = "the filesystem root" if dst == dst.parent else places.get(dst) or next(iter(held), None)
    if what:
        raise ConversionError(
            f"--mlx-path {mlx_path} is {what}: the model needs a directory of its own, which --force "
            "replaces whole; name a new one, e.g. --mlx-path lfm2-4bit"
        )
    recover_interrupted_write(dst)
    if dst.is_file():
        raise ConversionError(f"{dst} is a file: --mlx-path names the directory to write")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConversionError(
            f"{dst} already exists and is not empty: pass --force (force=True) to replace it, "
            "or choose another --mlx-path"
        )
    parent = next(p for p in dst.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConversionError(f"cannot write {dst}: {parent} is not a writable directory")
    return dst


def _prompt_ids(src: Path) -> list[int]:
    if not (src / "tokenizer.json").is_file():
        return PROMPT_IDS_WITHOUT_TOKENIZER
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(src / "tokenizer.json")).encode(PROMPT).ids


def _float32_logits(model: nn.Module, ids: mx.array) -> mx.array:
    """Float32 logits (unevaluated) without a float32 copy of the model: once the embedding's output is
    float32, MLX promotes each bf16 / fp16 weight (or quantization scale) per operation, transiently."""
    embed = model.model.embed_tokens
    saved = embed.parameters()
    embed.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, saved))
    logits = model(ids)
    embed.update(saved)
    return logits


def _quantization_plan(model: nn.Module, bits: int, group_size: int, recipe: Optional[str]) -> dict:
    """``{module path: to_quantized kwargs}``. Only Linear and Embedding layers can be quantized: norms and
    the conv kernel have no ``to_quantized`` and stay float. Like mlx-lm, a layer whose input width is
    not a multiple of the group size stays float too."""
    high = RECIPES[recipe][1] if recipe else bits
    plan = {}
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0:
            plan[path] = {"group_size": group_size, "bits": high if path in HIGH_PRECISION else bits, "mode": "affine"}
    return plan


def _quantize(model: nn.Module, plan: dict) -> list[QuantizedTensor]:
    """Swap layers for quantized ones one at a time: each float weight is freed as soon as its
    quantized form is evaluated, so the source and the result are never both whole in memory."""
    modules = dict(model.named_modules())
    tensors = []
    for path, q in plan.items():
        layer = modules.pop(path)
        quantized = layer.to_quantized(**q)
        # Dequantizing every row would triple the conversion time on the CPU backend.
        rows = slice(None, None, ERROR_ROW_STRIDE)
        w = layer.weight[rows].astype(mx.float32)
        restored = mx.dequantize(quantized.weight[rows], quantized.scales[rows], quantized.biases[rows], **q)
        diff = mx.abs(restored - w)
        max_rel = diff.max() / mx.maximum(mx.abs(w).max(), 1e-12)
        mean_rel = diff.mean() / mx.maximum(mx.abs(w).mean(), 1e-12)
        mx.eval(quantized.parameters(), max_rel, mean_rel)
        model.update_modules(tree_unflatten([(path, quantized)]))
        tensors.append(QuantizedTensor(f"{path}.weight", q["bits"], q["group_size"], max_rel.item(), mean_rel.item()))
    return tensors


def _agreement(reference: mx.array, converted: mx.array) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || converted) over the prompt's positions."""
    top1 = (reference.argmax(-1) == converted.argmax(-1)).astype(mx.float32).mean()
    logp = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    logq = converted - mx.logsumexp(converted, axis=-1, keepdims=True)
    kl = (mx.exp(logp) * (logp - logq)).sum(-1).mean()
    return top1.item(), kl.item()


def _model_card(report: ConversionReport, hub_id: bool) -> str:
    base = f"base_model: {report.source}\n" if hub_id else ""
    return (
        f"---\nlibrary_name: mlx\npipeline_tag: text-generation\ntags: [mlx, lfm2, liquid]\n{base}---\n\n"
        f"# {Path(report.mlx_path).name}\n\n"
        f"{report.source} converted to MLX with lfm-mlx (`python convert.py`). The directory has "
        "mlx-lm's layout: `lfm_mlx.load(path)` and `mlx_lm.load(path)` both read it. The license is "
        "the source model's.\n\n"
        "```python\nimport lfm_mlx\n\n"
        f'model, tokenizer = lfm_mlx.load("{report.mlx_path}")\n```\n\n'
        f"## Conversion report\n\n```\n{report.summary()}\n```\n"
    )


def _move_into_place(tmp: Path, dst: Path, aside: Path) -> None:
    """An existing destination is moved aside, and deleted only once the new one stands in its place. A
    crash between the two renames leaves both beside it, which ``recover_interrupted_write`` repairs."""
    if not dst.exists():
        tmp.rename(dst)
        return
    dst.rename(aside)
    try:
        tmp.rename(dst)
    except BaseException:
        aside.rename(dst)
        raise
    shutil.rmtree(aside)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the conversion writes, SIGTERM unwinds it (removing its temporary directory) and is then
    raised again under the default handler, so the process still ends by SIGTERM. Only the default
    handler is replaced, and only in the main thread: a program with its own handler keeps its policy
    (a handler that raises, as ``sys.exit`` does, removes the directory too)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
        raise  # only if SIGTERM is blocked
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
