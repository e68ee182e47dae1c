"""What a long-running serving process (the server, the app) sets once its model is loaded.

Measured under ``python -m app.soak`` (16 clients, 2 cores): a step carrying a 64-token prompt chunk
took 185 ms at the 95th percentile with OpenBLAS on two threads, 53 ms on one, because a BLAS product
split in two waits for whichever half the OS has put aside for the HTTP, tokenizer or engine thread;
and full garbage collections over the objects of the model, Gradio and transformers paused the engine
for up to 163 ms.
"""

from __future__ import annotations

import ctypes
import gc


def one_blas_thread() -> bool:
    """OpenBLAS (preloaded on Linux, see the README) on one thread; whether there was one to set."""
    try:
        set_threads = ctypes.CDLL(None).openblas_set_num_threads
    except (AttributeError, OSError):  # no OpenBLAS in this process (Accelerate on macOS, MLX's own BLAS)
        return False
    set_threads(1)
    return True


def settle_for_serving() -> None:
    """BLAS on one thread, and everything loaded so far out of the garbage collector's full passes."""
    one_blas_thread()
    gc.collect()
    gc.freeze()
