"""The quantized product on MLX's CPU backend, as a node of MLX's graph.

MLX's CPU ``quantized_matmul`` is a scalar loop whose running sum is one long dependency chain: about
1 ns per weight, so 4-bit LFM2-350M decodes at ~2.5 tok/s, far under what memory bandwidth allows.
``lfm_mlx/kernels/qmm.cpp`` is an MLX extension (a ``Primitive`` with ``eval_cpu``, MLX's "custom
extensions" layout) with two kernels for few rows of float32 input against affine 4/8-bit weights:
float activations (exact to float rounding, the reference) and int8 activations (quantized per 64
values and multiplied as integers: AVX-512 VNNI / AVX-VNNI / AVX2 on x86-64, plain C++ elsewhere,
~2-3x faster; on Intel AMX, 16 rows by 16 weight rows per tile instruction, for any number of rows).
Since it is a graph node, a decode step is one evaluation and can be compiled. The extension also holds
a vectorized SiLU, RMSNorm and RoPE as one node each (MLX's CPU fallbacks are six and thirty), and the
attention of decoding rows with their KV writes (``lfm_mlx.cpu_attention``).

It is built with CMake on first use against the installed ``mlx`` and ``nanobind`` and cached in
``~/.cache/lfm_mlx`` (or ``$LFM_MLX_CACHE``), keyed by the sources, the versions and the CPU. Without a
compiler or CMake, or when the build fails, one line says so and MLX's own kernels are used; on a GPU
they always are. ``LFM_MLX_CPU_KERNEL=0`` turns the extension off, ``LFM_MLX_INT8=0`` keeps float
activations, ``LFM_MLX_AMX=0`` keeps AMX's tiles off, ``LFM_MLX_THREADS=N`` sets the threads that share
a product (default: every core).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

import mlx.core as mx

SOURCES = Path(__file__).parent / "kernels"
# Above this many rows, dequantize-then-BLAS (lfm_mlx.quantized) is the faster path: for float
# activations, and for int8 ones (measured on a 2-core AVX-512 VNNI machine: equal at 128 rows).
MAX_ROWS = 32
INT8_MAX_ROWS = 128
# Activations per int8 scale, as in qmm.cpp (one row of an AMX tile).
BLOCK = 64
_module: Optional[ModuleType] = None
_tried = False


class BuildError(RuntimeError):
    pass


def int8_activations() -> bool:
    """Whether decode multiplies int8-quantized activations (the default) or float ones (exact)."""
    return os.environ.get("LFM_MLX_INT8", "1") != "0"


def _cache_dir() -> Path:
    return Path(os.environ.get("LFM_MLX_CACHE") or Path.home() / ".cache" / "lfm_mlx")


def _arch_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return ["-march=native"]
    return ["-mcpu=native"] if machine in ("arm64", "aarch64") else []


def _build_key() -> str:
    import nanobind

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu += next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    parts = [p.read_text() for p in sorted(SOURCES.iterdir()) if p.suffix in (".cpp", ".txt")]
    parts += [mx.__version__, nanobind.__version__, sys.version, cpu, *_arch_flags()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cmake() -> Optional[str]:
    """pip's cmake (beside this Python even when its environment is not activated), or the system's."""
    beside = Path(sys.executable).parent / "cmake"
    return str(beside) if beside.is_file() else shutil.which("cmake")


def _build(target: Path) -> None:
    """Configure and build the extension with CMake into ``target`` (atomically)."""
    if importlib.util.find_spec("nanobind") is None:  # its CMake files
        raise BuildError("nanobind is not installed (pip install -r requirements.txt)")
    cmake = _cmake()
    if cmake is None:
        raise BuildError("cmake was not found (pip install cmake, or your system's package)")
    print("lfm_mlx: building the CPU kernel (once, about a minute)…", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log = Path(tmp) / "build.log"
        for flags in (_arch_flags(), []):  # this CPU's vector units if the compiler knows them
            configure = [cmake, "-S", str(SOURCES), "-B", tmp + "/build", f"-DPython_EXECUTABLE={sys.executable}",
                         f"-DLFM_MLX_ARCH_FLAGS={' '.join(flags)}", "-DCMAKE_BUILD_TYPE=Release"]
            with log.open("w") as out:
                ok = subprocess.run(configure, stdout=out, stderr=subprocess.STDOUT).returncode == 0 and \
                    subprocess.run([cmake, "--build", tmp + "/build", "-j"], stdout=out,
                                   stderr=subprocess.STDOUT).returncode == 0
            if ok:
                break
            shutil.rmtree(tmp + "/build", ignore_errors=True)
        else:
            kept = target.parent / "qmm-build.log"
            shutil.copy(log, kept)
            errors = [l for l in log.read_text(errors="replace").splitlines()
                      if "error:" in l or l.startswith("CMake Error")] or ["no error line"]
            raise BuildError(f"the build failed: {errors[0].strip()[:200]} (full log: {kept})")
        built = next(Path(tmp, "build").glob("_qmm*" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")))
        os.replace(built, target)  # atomic: concurrent builders never see half a library


@contextlib.contextmanager
def _build_lock(cache: Path):
    """One builder at a time (several processes may start at once: a server and its tests)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "qmm.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: MLX does not run there anyway
            pass
        yield


def _load() -> ModuleType:
    cache = _cache_dir()
    path = cache / f"qmm-{_build_key()}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if not path.is_file():
        with _build_lock(cache):
            if not path.is_file():
                _build(path)
    loader = importlib.machinery.ExtensionFileLoader("_qmm", str(path))
    spec = importlib.util.spec_from_file_location("_qmm", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    # A nanobind whose ABI differs from mlx's cannot take mlx arrays: check with a real product.
    try:
        w, s, b = mx.quantize(mx.ones((8, 64)), 64, 4)
        mx.eval(module.quantized_matmul(mx.ones((1, 64)), w, s, b, 64, 4, False, stream=mx.cpu))
    except TypeError as e:
        raise BuildError("it cannot take mlx arrays: its nanobind does not match mlx's "
                         "(pip install -U nanobind, then delete " + str(path) + ")") from e
    return module


def extension() -> Optional[ModuleType]:
    """The built extension, or None when it is switched off or cannot be built here (said once)."""
    global _module, _tried
    if not _tried:
        _tried = True
        if os.environ.get("LFM_MLX_CPU_KERNEL", "1") != "0":
            try:
                _module = _load()
            except (BuildError, OSError, ImportError, subprocess.SubprocessError, StopIteration) as e:
                print(f"lfm_mlx: the fast CPU kernel is not available ({e}); using MLX's own quantized "
                      "kernels, which decode several times slower", file=sys.stderr, flush=True)
    return _module


def applies(layer) -> bool:
    """Whether the kernel takes ``layer`` (affine 4/8-bit, float32 scales) for float32 rows."""
    return (
        layer.mode == "affine"
        and layer.bits in (4, 8)
        and layer.group_size % 16 == 0
        and layer["scales"].dtype == mx.float32
        and extension() is not None
    )


def rounds_activations(layer) -> bool:
    """Whether the kernel multiplies int8-rounded activations for ``layer``: with ``LFM_MLX_INT8``
    on (the default) and a shape its int8 path takes (else its float path runs)."""
    K = layer["weight"].shape[-1] * 32 // layer.bits
    return int8_activations() and applies(layer) and extension().int8_supported(layer.bits, K, layer.group_size)


def amx() -> bool:
    """Whether int8 products run on Intel AMX tiles (x86-64 CPUs that have them, Linux; ``LFM_MLX_AMX=0``
    turns them off): then every product, a prompt's too, goes through the kernel."""
    return int8_activations() and extension() is not None and extension().amx()


def quantized_matmul(x: mx.array, layer, int8: Optional[bool] = None) -> mx.array:
    """``mx.quantized_matmul(x, layer.weight, …, transpose=True)`` by the kernel, for float32 ``x`` on
    the CPU; ``int8`` picks the activations (default: ``int8_activations()``)."""
    return extension().quantized_matmul(
        x, layer["weight"], layer["scales"], layer["biases"], layer.group_size, layer.bits,
        int8_activations() if int8 is None else int8, stream=mx.cpu,
    )
