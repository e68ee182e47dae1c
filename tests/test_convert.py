"""Converting checkpoints to MLX: sizes, interchange with mlx-lm both ways, recipes, and bad input that
leaves no trace."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import LFM2_350M, real_350m_config, require_shared, write_checkpoint

import lfm_mlx
from lfm_mlx.convert import BITS, ConversionError, convert

ROOT = Path(__file__).resolve().parents[1]
IDS = mx.array([[1, 1098, 552]])  # short: quantized matmul on the CPU backend costs ~0.5 s a token at 350M


def lfm_logits(path: Path, tokenizer: bool = False) -> mx.array:
    model = lfm_mlx.load(path, dtype="float32")[0] if tokenizer else lfm_mlx.load_model(path, dtype="float32")
    return model(IDS)


def mlx_lm_logits(path: Path, tokenizer: bool = False) -> mx.array:
    import mlx_lm
    from mlx_lm.utils import load_model

    model = mlx_lm.load(str(path))[0] if tokenizer else load_model(path)[0]
    model.set_dtype(mx.float32)  # it keeps the file's bf16 otherwise: ~10x slower on the CPU backend
    return model(IDS)


def rel_max_diff(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.fixture(scope="module")
def bf16_350m(tmp_path_factory) -> Path:
    """Random weights in the LFM2-350M shape, stored in bfloat16 like the published checkpoint."""
    require_shared()
    path = tmp_path_factory.mktemp("bf16-350m")
    return write_checkpoint(path, real_350m_config(), tokenizer_from=LFM2_350M, dtype="bfloat16")


@pytest.fixture(scope="module")
def cli_4bit(bf16_350m, tmp_path_factory):
    dst = tmp_path_factory.mktemp("cli") / "lfm2-350m-4bit"
    start = time.perf_counter()
    args = [sys.executable, "convert.py", "--hf-path", str(bf16_350m), "--mlx-path", str(dst), "-q"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    print(f"\nconvert.py -q on the 350M shape: {time.perf_counter() - start:.1f} s wall\n{result.stdout}")
    assert result.returncode == 0, result.stderr
    return dst, result


def test_cli_quantizes_350m_to_4bit_in_mlx_lm_layout(bf16_350m, cli_4bit):
    dst, result = cli_4bit
    assert weight_bytes(dst) <= 0.30 * weight_bytes(bf16_350m)
    config = json.loads((dst / "config.json").read_text())
    assert {k: config["quantization"][k] for k in ("group_size", "bits")} == {"group_size": 64, "bits": 4}
    assert config["quantization_config"] == config["quantization"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (dst / name).read_bytes() == (bf16_350m / name).read_bytes(), name
    card = (dst / "README.md").read_text()
    for line in ("bits/weight", "tensor error", "agreement", "4-bit affine, group size 64"):
        assert line in card and line in result.stdout, line
    assert not list(dst.parent.glob(".*")), "temporary directories left behind"


def test_norms_and_conv_kernels_stay_float_every_linear_is_4bit(cli_4bit):
    dst, _ = cli_4bit
    weights = mx.load(str(dst / "model.safetensors"))
    assert not [k for k in weights if "norm" in k and not k.endswith("norm.weight")]
    conv = weights["model.layers.0.conv.conv.weight"]
    assert (conv.shape, conv.dtype) == ((1024, 3, 1), mx.bfloat16)
    linear = [k.removesuffix(".scales") for k in weights if k.endswith(".scales")]
    assert len(linear) == 1 + 6 * 4 + 10 * 2 + 16 * 3  # embedding, attention, conv projections, MLPs
    assert all(weights[f"{k}.weight"].dtype == mx.uint32 for k in linear)


def test_cli_output_gives_the_same_logits_in_lfm_mlx_and_mlx_lm(cli_4bit):
    dst, _ = cli_4bit
    assert rel_max_diff(lfm_logits(dst, tokenizer=True), mlx_lm_logits(dst, tokenizer=True)) <= 1e-2


def test_mlx_lm_convert_output_loads_in_lfm_mlx_with_mlx_lm_logits(bf16_350m, tmp_path):
    import mlx_lm

    dst = tmp_path / "mlx-lm-4bit"
    mlx_lm.convert(str(bf16_350m), str(dst), quantize=True)
    assert rel_max_diff(lfm_logits(dst), mlx_lm_logits(dst)) <= 1e-2


def test_published_8bit_layout_loads_in_lfm_mlx(tiny_checkpoint, tmp_path, monkeypatch):
    """LiquidAI's LFM2.5-350M-MLX-8bit is mlx-lm's layout: 8 bits, group size 64, conv kernels [C, K, 1]."""
    import mlx_lm

    monkeypatch.setenv("LFM_MLX_INT8", "0")  # float activations: the dequantized model's exact logits
    require_shared()
    dst = tmp_path / "8bit"
    mlx_lm.convert(str(tiny_checkpoint), str(dst), quantize=True, q_bits=8, q_group_size=64)
    config = json.loads((dst / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (8, 64)
    width = config["hidden_size"]
    assert mx.load(str(dst / "model.safetensors"))["model.layers.0.conv.conv.weight"].shape == (width, 3, 1)
    quantized = lfm_logits(dst)
    assert rel_max_diff(quantized, mlx_lm_logits(dst)) <= 1e-2
    convert(dst, tmp_path / "float", dequantize=True)
    assert rel_max_diff(lfm_logits(tmp_path / "float"), quantized) <= 1e-4


def test_quantization_error_and_kl_shrink_as_bits_grow(tiny_checkpoint, tmp_path):
    errors, kls, bits_per_weight = [], [], []
    for bits in BITS:
        report = convert(tiny_checkpoint, tmp_path / f"{bits}bit", q_bits=bits)
        assert lfm_mlx.load_model(tmp_path / f"{bits}bit").model.layers[0].feed_forward.w1.bits == bits
        errors.append(sum(t.mean_rel_error for t in report.tensors) / len(report.tensors))
        kls.append(report.kl)
        bits_per_weight.append(report.bits_per_weight)
        assert 0 <= report.top1_agreement <= 1
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 < errors[0], errors
    assert kls == sorted(kls, reverse=True) and kls[-1] < 1e-4, kls
    assert bits_per_weight == sorted(bits_per_weight) and bits_per_weight[0] > 2, bits_per_weight


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_group_sizes_load_alike_in_lfm_mlx_and_mlx_lm(tiny_checkpoint, tmp_path, group_size):
    report = convert(tiny_checkpoint, tmp_path / "q", q_group_size=group_size)
    assert {t.group_size for t in report.tensors} == {group_size}
    assert rel_max_diff(lfm_logits(tmp_path / "q"), mlx_lm_logits(tmp_path / "q")) <= 1e-2


@pytest.mark.parametrize("recipe,high", [("mixed_4_6", 6), ("mixed_4_8", 8)])
def test_mixed_recipe_keeps_the_embedding_at_more_bits(tiny_checkpoint, tmp_path, recipe, high):
    report = convert(tiny_checkpoint, tmp_path / "q", quant_recipe=recipe)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == high
    model = lfm_mlx.load_model(tmp_path / "q")
    assert (model.model.embed_tokens.bits, model.model.layers[1].self_attn.q_proj.bits) == (high, 4)
    assert {t.bits for t in report.tensors} == {4, high}
    assert rel_max_diff(lfm_logits(tmp_path / "q"), mlx_lm_logits(tmp_path / "q")) <= 1e-2


def test_dequantize_turns_a_quantized_directory_back_into_float_weights(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_MLX_INT8", "0")  # float activations: the dequantized model's exact logits
    convert(tiny_checkpoint, tmp_path / "q")
    report = convert(tmp_path / "q", tmp_path / "f", dequantize=True, dtype="float32")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert not [k for k in mx.load(str(tmp_path / "f" / "model.safetensors")) if k.endswith("scales")]
    assert report.bits is None and report.kl < 1e-6
    a, b = lfm_mlx.load_model(tmp_path / "q")(IDS), lfm_mlx.load_model(tmp_path / "f")(IDS)
    assert rel_max_diff(a, b) <= 1e-5


def test_dtype_alone_writes_float_weights(tiny_checkpoint, tmp_path, capsys):
    import convert as cli

    cli.main(["--hf-path", str(tiny_checkpoint), "--mlx-path", str(tmp_path / "f16"), "--dtype", "float16"])
    config = json.loads((tmp_path / "f16" / "config.json").read_text())
    assert "quantization" not in config
    weights = mx.load(str(tmp_path / "f16" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.float16}
    assert "float weights (float16)" in capsys.readouterr().out


def test_cli_refuses_quantize_with_dequantize(tiny_checkpoint, tmp_path):
    import convert as cli

    with pytest.raises(SystemExit, match="--dequantize writes float weights: drop -q"):
        cli.main(["--hf-path", str(tiny_checkpoint), "--mlx-path", str(tmp_path / "out"), "-q", "--dequantize"])
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_a_non_empty_destination(tiny_checkpoint, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    convert(tiny_checkpoint, dst, force=True)
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_writing_leaves_the_old_destination_and_no_temporary_files(tiny_checkpoint, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("lfm_mlx.convert.save_config", disk_full)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(OSError, match="No space left"):
        convert(tiny_checkpoint, dst, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(quant_recipe="mixed_9_9"), "unknown quant recipe 'mixed_9_9': use one of mixed_3_6"),
    (dict(quant_recipe="mixed_4_6", q_bits=4), "sets the bits itself"),
    (dict(dequantize=True, q_group_size=64), "only apply when quantizing"),
    (dict(dequantize=True), "not an MLX-quantized directory"),
    (dict(dtype="float8"), "unsupported dtype 'float8'"),
])
def test_conflicting_options_are_refused_before_anything_is_written(tiny_checkpoint, tmp_path, kwargs, message):
    with pytest.raises(ConversionError, match=message):
        convert(tiny_checkpoint, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_destination_over_the_source_is_refused_even_with_force(tiny_checkpoint, tmp_path):
    src = shutil.copytree(tiny_checkpoint, tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ConversionError, match="holds the source checkpoint"):
        convert(src, src / "sub" / "..", force=True)
    assert sorted(p.name for p in src.iterdir()) == before


def test_quantizing_a_quantized_directory_is_refused(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint, tmp_path / "q")
    with pytest.raises(ConversionError, match="already quantized: .* or pass --dequantize"):
        convert(tmp_path / "q", tmp_path / "qq")
    assert not (tmp_path / "qq").exists()


def make_bad_source(kind: str, tiny_checkpoint: Path, where: Path) -> Path:
    if kind == "missing path":
        return where / "nope"
    src = shutil.copytree(tiny_checkpoint, where / "src")
    if kind == "no safetensors":
        (src / "model.safetensors").unlink()
    elif kind == "unknown model_type":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif kind == "truncated safetensors":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return src


BAD_INPUTS = [
    # (source, extra flags, destination already holds a file, expected message)
    ("missing path", [], False, "no such model directory"),
    ("no safetensors", [], False, r"no \*.safetensors weights in"),
    ("unknown model_type", [], False, "unknown model_type 'llama'"),
    ("truncated safetensors", [], False, "truncated or corrupt"),
    ("good", ["--q-bits", "7"], False, "unsupported bits 7: use one of 2, 3, 4, 5, 6, 8"),
    ("good", ["--q-group-size", "48"], False, "unsupported group size 48: use one of 32, 64, 128"),
    ("good", [], True, "already exists and is not empty: pass --force"),
]


@pytest.fixture(scope="module")
def bad_runs(tiny_checkpoint, tmp_path_factory) -> list:
    """Every bad-input case through the CLI, all at once: each run is mostly interpreter start-up."""
    runs = []
    for kind, flags, dst_exists, _ in BAD_INPUTS:
        where = tmp_path_factory.mktemp("bad")
        src = make_bad_source(kind, tiny_checkpoint, where)
        dst = where / "out" / "model"
        if dst_exists:
            dst.mkdir(parents=True)
            (dst / "keep.txt").write_text("precious")
        args = [sys.executable, "convert.py", "--hf-path", str(src), "--mlx-path", str(dst), *flags]
        runs.append((subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), dst))
    return [(proc.communicate()[1], proc.returncode, dst) for proc, dst in runs]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[f"{k} {' '.join(f)}".strip() for k, f, *_ in BAD_INPUTS])
def test_bad_input_fails_in_one_line_and_leaves_destination_untouched(bad_runs, case):
    stderr, returncode, dst = bad_runs[case]
    _, _, dst_exists, message = BAD_INPUTS[case]
    assert returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert.py: error: "), stderr
    assert re.search(message, lines[0]), lines[0]
    if dst_exists:
        assert [p.name for p in dst.parent.iterdir()] == ["model"]
        assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    else:
        assert not dst.parent.exists()


# Careless input: destinations that would delete more than a model, nonsense configs, NaN weights, and
# what killed runs leave behind.


@pytest.fixture
def untouchable(monkeypatch):
    """Fails the test on any deletion, rename or new directory: refusals must come first."""

    def touched(*args, **kwargs):
        raise AssertionError(f"filesystem changed before the refusal: {args}")

    for name in ("rename", "replace", "mkdir", "makedirs", "rmdir", "unlink", "remove"):
        monkeypatch.setattr(os, name, touched)
    monkeypatch.setattr(shutil, "rmtree", touched)


@pytest.mark.parametrize("mlx_path,message", [
    ("", "--mlx-path is empty, which means the current directory: name the directory to write"),
    (".", "--mlx-path . is the current directory: .* name a new one, e.g. --mlx-path lfm2-4bit"),
    ("~", "--mlx-path ~ is your home directory: .* name a new one"),
    ("/", "--mlx-path / is the filesystem root: .* name a new one"),
    ("..", r"--mlx-path \.\. is a directory holding the current directory"),
], ids=["empty", "dot", "tilde", "root", "parent of cwd"])
def test_cli_refuses_destinations_that_force_would_wipe(tiny_checkpoint, tmp_path, monkeypatch, mlx_path, message):
    import convert as cli

    home, cwd = tmp_path / "home", tmp_path / "work" / "here"
    for place in (home, cwd):
        place.mkdir(parents=True)
        (place / "sentinel.txt").write_text("precious")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--hf-path", str(tiny_checkpoint), "--mlx-path", mlx_path, "--force"])
    assert isinstance(excinfo.value.code, str) and excinfo.value.code.startswith("convert.py: error: ")
    assert "\n" not in excinfo.value.code and re.search(message, excinfo.value.code), excinfo.value.code
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (cwd / "sentinel.txt").read_text() == (home / "sentinel.txt").read_text() == "precious"


@pytest.mark.parametrize("mlx_path", ["", ".", "~", "/", "/tmp/.."])
def test_wiping_destinations_are_refused_before_any_filesystem_change(tiny_checkpoint, tmp_path, monkeypatch,
                                                                      untouchable, mlx_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match="--mlx-path"):
        convert(tiny_checkpoint, mlx_path, force=True)


def test_ancestor_of_the_source_is_refused_with_force_and_nothing_is_deleted(tiny_checkpoint, tmp_path):
    import convert as cli

    src = shutil.copytree(tiny_checkpoint, tmp_path / "models" / "src")
    (tmp_path / "models" / "sentinel.txt").write_text("precious")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit, match="holds the source checkpoint: choose another --mlx-path"):
        cli.main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "models"), "--force"])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("config,message", [
    ("[1, 2]", "config.json holds an array, not an object"),
    (dict(num_attention_heads=0), "num_attention_heads is 0 in config.json: use an integer from 1 to 1,024"),
    (dict(vocab_size=1e12), r"vocab_size is 1000000000000\.0 in config.json: use an integer from 1 to 16,777,216"),
    (dict(hidden_size=130), r"hidden_size \(130\) must be a multiple of num_attention_heads \(4\)"),
])
def test_cli_reports_a_nonsense_config_in_one_line(tmp_path, config, message):
    import convert as cli
    from test_config import write_config

    write_config(tmp_path / "src", config)
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--hf-path", str(tmp_path / "src"), "--mlx-path", str(tmp_path / "out")])
    assert re.fullmatch(f"convert.py: error: .*{message}.*", excinfo.value.code), excinfo.value.code
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_source_with_nan_or_inf_is_refused_naming_the_tensor(poisoned_checkpoint, tmp_path, value):
    src = poisoned_checkpoint(value=value)
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.1\.self_attn\.q_proj\.weight of .* holds NaN "
                                              r"or inf values: the checkpoint is damaged; download it again"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_sigterm_while_writing_removes_the_temporary_folder_and_keeps_the_old_copy(tiny_checkpoint, tmp_path):
    dst, writing = tmp_path / "out", tmp_path / "writing"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    # The real CLI in a child process, held mid-write: weights saved, config.json not yet.
    script = (
        "import sys, time\n"
        "import lfm_mlx.convert, convert\n"
        f"lfm_mlx.convert.save_config = lambda *args: open({str(writing)!r}, 'w').close() or time.sleep(120)\n"
        "convert.main(sys.argv[1:])\n"
    )
    args = ["--hf-path", str(tiny_checkpoint), "--mlx-path", str(dst), "--force"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not writing.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no write began"
            time.sleep(0.05)
        assert (next(tmp_path.glob(".out.tmp-*")) / "model.safetensors").is_file()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "writing"]
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_sigterm_handler_is_installed_only_while_writing(tiny_checkpoint, tmp_path, monkeypatch):
    import lfm_mlx.convert

    during = []
    save_config = lfm_mlx.convert.save_config
    monkeypatch.setattr(lfm_mlx.convert, "save_config",
                        lambda *args: during.append(signal.getsignal(signal.SIGTERM)) or save_config(*args))
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a command-line run
    try:
        convert(tiny_checkpoint, tmp_path / "out")
        assert callable(during[0]) and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_next_run_removes_temporary_folders_of_dead_conversions_only(tiny_checkpoint, tmp_path, dead_pid):
    stale, live = tmp_path / f".out.tmp-{dead_pid}-0123abcd", tmp_path / f".out.tmp-{os.getpid()}-89abcdef"
    other = tmp_path / f".other.tmp-{dead_pid}-0123abcd"  # another destination's: not this run's business
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    with pytest.warns(UserWarning, match=f"removed 1 temporary folder.* left by interrupted conversions .*{stale.name}"):
        convert(tiny_checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])


def test_next_run_completes_an_overwrite_killed_between_its_renames(tiny_checkpoint, tmp_path, dead_pid, capsys):
    """kill -9 after the old copy was moved aside and before the new, complete one was moved in."""
    import convert as cli

    old = tmp_path / f".model.old-{dead_pid}-0123abcd"
    old.mkdir()
    (old / "old.txt").write_text("old")
    shutil.copytree(tiny_checkpoint, tmp_path / f".model.tmp-{dead_pid}-0123abcd")
    with pytest.raises(SystemExit, match="model already exists and is not empty: pass --force"):
        cli.main(["--hf-path", str(tiny_checkpoint), "--mlx-path", str(tmp_path / "model")])
    notices = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 1)[0] for line in notices] == ["convert.py"] * 2, notices
    assert "model was missing after an interrupted --force overwrite: moved the new, complete copy" in notices[0]
    assert f"removed 1 temporary folder(s) beside {tmp_path / 'model'}" in notices[1]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(p.name for p in tiny_checkpoint.iterdir())
