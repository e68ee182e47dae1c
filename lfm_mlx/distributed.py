"""Batch extraction over several processes or hosts, with MLX's own launcher and ``mx.distributed``.

    mlx.launch -n 2 --backend ring -m lfm_mlx.extract --schema S --input docs.jsonl --output out.jsonl
    mlx.launch --hosts mac1,mac2 --backend ring -m lfm_mlx.extract ...

Rank 0 holds the input and the output (no shared filesystem is assumed). Each round it hands every rank
a chunk of records, each rank extracts its chunk on its own engine, and rank 0 gathers the rows. Chunks
are sized by each rank's speed in the previous round, so a slower host gets less work (rounds are in
step: a host that stalls holds the round back). Records and rows travel as bytes in uint8 arrays, by
collectives only (``all_sum`` as a broadcast, ``all_gather``), which every backend has (the ring backend
sends only between neighbours). A world of one process runs the same loop with no traffic.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

MAX_CHUNK = 256  # records one rank takes in one round, at most


class World:
    """The processes ``mlx.launch`` started (or just this one), and bytes between them."""

    def __init__(self, group: Optional[Any] = None) -> None:
        self.group = group or mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    def broadcast(self, payload: Optional[bytes]) -> bytes:
        """Rank 0's ``payload`` on every rank (the others pass None)."""
        if self.size == 1:
            return payload or b""
        mine = (payload or b"") if self.rank == 0 else b""
        n = int(self._sum(np.array([len(mine)], np.int64))[0])
        data = np.frombuffer(mine, np.uint8) if self.rank == 0 else np.zeros(n, np.uint8)
        return self._sum(data).tobytes() if n else b""

    def gather(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, in rank order, on every rank."""
        if self.size == 1:
            return [payload]
        lengths = self._gather(np.array([len(payload)], np.int64)).tolist()
        width = max(max(lengths), 1)
        padded = np.zeros(width, np.uint8)
        padded[: len(payload)] = np.frombuffer(payload, np.uint8)
        rows = self._gather(padded).reshape(self.size, width)
        return [rows[r, :n].tobytes() for r, n in enumerate(lengths)]

    def _sum(self, data: np.ndarray) -> np.ndarray:
        out = mx.distributed.all_sum(mx.array(data), group=self.group, stream=mx.cpu)
        return np.array(out)

    def _gather(self, data: np.ndarray) -> np.ndarray:
        out = mx.distributed.all_gather(mx.array(data), group=self.group, stream=mx.cpu)
        return np.array(out)


Work = Callable[[list[tuple[int, str]], Callable[[int, dict], None]], None]


def run_rounds(world: World, work: Work, todo: Sequence[tuple[int, str]] = (),
               on_row: Optional[Callable[[int, dict], None]] = None, chunk: int = 8,
               log: Callable[[str], None] = print) -> None:
    """Extract ``todo`` (rank 0's ``(index, text)`` records; the others pass nothing) over the world,
    about ``chunk`` records per rank per round: ``work(records, emit)`` calls ``emit(index, row)`` as
    each record finishes on the rank that runs it. Rank 0 gets ``on_row(index, row)`` for its own rows
    as they finish and for the others' as their round ends. Every rank returns when all is done; an
    error on any rank (a host lost) raises on the others (``mlx.launch`` stops them all), and rank 0
    logs which records each rank held unfinished."""
    hosts = [h.decode() for h in world.gather(socket.gethostname().encode())]
    queue = list(todo)
    speed = [0.0] * world.size  # records per second, last round
    chunk_sizes = [chunk] * world.size
    while True:
        plan, chunks = None, [[] for _ in range(world.size)]
        if world.rank == 0:
            sizes, total = list(chunk_sizes), sum(chunk_sizes)
            if len(queue) < total:  # the last records: shared in the same proportions
                sizes = [len(queue) * s // total for s in sizes]
                for r in range(len(queue) - sum(sizes)):
                    sizes[r % world.size] += 1
            chunks, start = [], 0
            for size in sizes:
                chunks.append(queue[start : start + size])
                start += size
            del queue[:start]
            plan = json.dumps(chunks).encode()
        started, rows, finished = time.perf_counter(), [], set()

        def emit(i: int, row: dict) -> None:
            finished.add(i)
            if world.rank == 0 and on_row is not None:
                on_row(i, row)  # kept at once: an interrupted round loses nothing finished here
            else:
                rows.append((i, row))

        exchanging = True
        try:
            chunks = json.loads(world.broadcast(plan))
            if not any(chunks):
                return
            exchanging = False
            work([(i, text) for i, text in chunks[world.rank]], emit)
            seconds, exchanging = time.perf_counter() - started, True
            gathered = world.gather(json.dumps({"rows": rows, "seconds": seconds}).encode())
            received = [json.loads(blob) for blob in gathered] if world.rank == 0 else []
        except BaseException as e:
            if world.rank == 0 and world.size > 1:
                for r, held in enumerate(chunks):
                    unfinished = [i for i, _ in held if r or i not in finished]
                    if unfinished:
                        log(f"rank {r} ({hosts[r]}) held {len(unfinished)} unfinished records (no. "
                            f"{', '.join(str(i + 1) for i in unfinished[:8])}{', …' if len(unfinished) > 8 else ''})")
            if exchanging and world.size > 1 and isinstance(e, Exception):  # a peer died mid-collective
                raise RuntimeError(f"lost contact with another rank ({type(e).__name__}: {e})") from e
            raise
        if world.rank == 0:
            for r, done in enumerate(received):
                for i, row in done["rows"]:
                    if on_row is not None:
                        on_row(i, row)
                if chunks[r]:
                    speed[r] = len(chunks[r]) / max(done["seconds"], 1e-3)
            measured = [s for s in speed if s]
            mean = sum(measured) / len(measured) if measured else 0.0
            # A round ends when its slowest rank ends: give each rank a share that takes the same time.
            chunk_sizes = [max(1, min(MAX_CHUNK, round(chunk * s / mean))) if s and mean else chunk for s in speed]


def read_journal(path) -> Iterator[dict]:
    """Rows a run appended to its journal (a torn last line from a killed run is skipped)."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue
