"""Per-layer decoding state for the LFM2 hybrid, snapshots of it, and prefix reuse across prompts.

Conv layers keep a constant state (the last ``conv_L_cache - 1`` conv inputs), whatever the length.
Attention layers keep K/V in a ``KVCache`` bounded by ``max_size``: once full it keeps the first ``keep``
tokens (attention sinks) and the most recent ones, StreamingLLM-style, so RoPE positions never leave
the trained window. Layers never own a cache; the model receives the list from ``make_cache``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

DEFAULT_MAX_KV_SIZE = 32_768  # LFM2.5's trained context


class ConvCache:
    """The last ``K - 1`` inputs of a depthwise causal conv of width ``K``."""

    def __init__(self) -> None:
        self.state: Optional[mx.array] = None  # [B, K - 1, C]
        self.offset = 0  # tokens seen
        # Keeping the last call's whole input window [B, K - 1 + L, C] makes the state after any of its
        # L positions a slice of it: rejected drafts cost no recomputation, and a snapshot can be taken
        # inside a prefill chunk without splitting it.
        self.keep_window = False
        self.window: Optional[mx.array] = None

    def rewind(self, fed: int, kept: int) -> None:
        """Forget the last ``fed - kept`` of the ``fed`` tokens of the last call (needs ``keep_window``)."""
        if kept < fed:
            self.state = self.state_after(fed, kept)
            self.offset -= fed - kept

    def state_after(self, fed: int, kept: int) -> mx.array:
        """The state after the first ``kept`` of the last call's ``fed`` tokens (needs ``keep_window``)."""
        width = self.state.shape[1]
        # A copy: a slice would keep the whole window's buffer alive as long as the state.
        return self.state if kept == fed else mx.contiguous(self.window[:, kept : kept + width])


class KVCache:
    """Keys/values of one attention layer.

    Storage grows in steps up to ``max_size``. When new tokens would overflow it, a chunk right after
    the sinks is dropped, the rest slides left and its keys are re-rotated by the same delta, so the
    cached positions stay ``0 … size - 1``. Dropping a chunk (not one token) at a time keeps that
    re-rotation rare enough that decode speed does not depend on the window being full.
    With ``bits`` set, K/V are stored affine-quantized (``mx.quantize``) and read back by quantized
    matmuls.
    """

    step = 256

    def __init__(
        self,
        max_size: Optional[int] = DEFAULT_MAX_KV_SIZE,
        keep: int = 4,
        bits: Optional[int] = None,
        group_size: int = 64,
        rope=None,
    ) -> None:
        if max_size is not None and max_size <= keep:
            raise ValueError(f"max_kv_size ({max_size}) must be larger than keep ({keep})")
        if bits not in (None, 4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, not {bits}")
        self.max_size, self.keep = max_size, keep
        self.bits, self.group_size = bits, group_size
        self.rope = rope
        self.keys: Optional[tuple] = None  # tuples: (array,) or (packed, scales, biases), [B, H, cap, …]
        self.values: Optional[tuple] = None
        self.offset = 0  # tokens held = RoPE position of the next token
        self.evictions = 0  # bumped when rolling rewrites history: older snapshots become stale

    def _pack(self, x: mx.array) -> tuple:
        return (x,) if self.bits is None else tuple(mx.quantize(x, self.group_size, self.bits))

    def _unpack(self, t: tuple) -> mx.array:
        return t[0] if self.bits is None else mx.dequantize(*t, group_size=self.group_size, bits=self.bits)

    def _reserve(self, k: tuple, v: tuple, needed: int) -> None:
        if self.keys is not None and needed <= self.keys[0].shape[2]:
            return
        capacity = -(-needed // self.step) * self.step
        if self.max_size is not None:
            capacity = min(capacity, self.max_size)

        def grow(old: Optional[tuple], like: tuple) -> tuple:
            new = tuple(mx.zeros((*a.shape[:2], capacity, a.shape[3]), a.dtype) for a in like)
            if old is not None and self.offset:
                for n, o in zip(new, old):
                    n[..., : self.offset, :] = o[..., : self.offset, :]
            return new

        self.keys, self.values = grow(self.keys, k), grow(self.values, v)

    def prepare(self, n: int) -> int:
        """Make room for ``n`` new tokens; return the RoPE position of the first."""
        if self.max_size is not None and self.offset + n > self.max_size:
            self._evict(self.offset + n - self.max_size)
        return self.offset

    def _evict(self, needed: int) -> None:
        window = self.max_size - self.keep
        if needed > self.offset - self.keep:
            raise ValueError(
                f"{needed} new tokens do not fit a KV window of {self.max_size} (keep={self.keep}): "
                f"feed at most {window} tokens at a time"
            )
        chunk = min(max(needed, min(1024, max(1, self.max_size // 16))), self.offset - self.keep)
        src, dst = slice(self.keep + chunk, self.offset), slice(self.keep, self.offset - chunk)
        tail = self._unpack(tuple(b[..., src, :] for b in self.keys))
        B, H, T, D = tail.shape
        # Every kept key moves back by `chunk` positions: one rotation by -chunk for all of them.
        tail = self.rope(tail.reshape(B * H * T, 1, D), offset=-chunk).reshape(B, H, T, D)
        for buf, new in zip(self.keys, self._pack(tail)):
            buf[..., dst, :] = new
        for buf in self.values:
            buf[..., dst, :] = buf[..., src, :]
        self.offset -= chunk
        self.evictions += 1

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        n = keys.shape[2]
        k, v = self._pack(keys), self._pack(values)
        self._reserve(k, v, self.offset + n)
        for buf, new in zip(self.keys + self.values, k + v):
            buf[..., self.offset : self.offset + n, :] = new
        self.offset += n
        ks = tuple(b[..., : self.offset, :] for b in self.keys)
        vs = tuple(b[..., : self.offset, :] for b in self.values)
        return (ks[0], vs[0]) if self.bits is None else (ks, vs)

    def make_room(self, n: int, like: mx.array) -> None:
        """Room for ``n`` more full-precision tokens, keys and values like the rows of ``like``
        [·, heads, ·, D], for attention that writes them into the buffers itself
        (``lfm_mlx.cpu_attention``) and hands back the buffers to ``written``. The buffers are this
        cache's alone (copies are made, never shared), which is what makes writing into them in place safe."""
        if self.keys is None or self.offset + n > self.keys[0].shape[2]:
            self._reserve((like[:1],), (like[:1],), self.offset + n)

    def written(self, keys: mx.array, values: mx.array, n: int) -> None:
        """The buffers after ``n`` tokens were written at ``offset`` by such attention."""
        self.keys, self.values = (keys,), (values,)
        self.offset += n

    def rewind(self, fed: int, kept: int) -> None:
        """Forget the last ``fed - kept`` tokens written (their slots are simply overwritten later)."""
        self.offset -= fed - kept

    def shrink(self) -> None:
        """Cut the buffers to the tokens held, for a cache that is kept but never written again (a
        prefix-cache entry): storage grows ``step`` tokens at a time, so up to 255 tokens' worth of
        every buffer would be empty."""
        if self.keys is not None and self.keys[0].shape[2] > self.offset:
            self.keys, self.values = (tuple(mx.contiguous(b[..., : self.offset, :]) for b in t)
                                      for t in (self.keys, self.values))

    def copy_prefix(self, n: int) -> "KVCache":
        """A new cache with these settings holding this one's first ``n`` tokens, in buffers of its own
        (later writes to either never reach the other)."""
        copy = KVCache(self.max_size, self.keep, self.bits, self.group_size, self.rope)
        if n and self.keys is not None:
            copy._reserve(self.keys, self.values, n)
            for dst, src in zip(copy.keys + copy.values, self.keys + self.values):
                dst[..., :n, :] = src[..., :n, :]
            copy.offset = n
        return copy


def make_cache(
    model,
    max_kv_size: Optional[int] = None,
    keep: int = 4,
    kv_bits: Optional[int] = None,
) -> list:
    """One cache per layer. ``max_kv_size=None`` means the trained context (32,768 tokens); 0 means
    unbounded."""
    if max_kv_size is None:
        max_kv_size = min(DEFAULT_MAX_KV_SIZE, model.args.max_position_embeddings)
    head_dim = model.args.head_dim
    group_size = next((g for g in (64, 32) if head_dim % g == 0), None)
    if kv_bits is not None and group_size is None:
        raise ValueError(f"kv_bits needs a head_dim divisible by 32; this model's is {head_dim}")
    return [
        KVCache(max_kv_size or None, keep, kv_bits, group_size or 64, rope=layer.self_attn.rope)
        if layer.is_attention
        else ConvCache()
        for layer in model.layers
    ]


@dataclass(frozen=True)
class Snapshot:
    """The hybrid state at one token position: conv states are tiny and kept whole; KV is a length."""

    conv_states: tuple
    offsets: tuple
    evictions: tuple


def snapshot(cache: list, back: int = 0) -> Snapshot:
    """The state now, or ``back`` tokens before the end of the last call (its conv layers must have
    kept their window). Conv states are replaced, never mutated, by the model: references suffice."""

    def conv_state(c: ConvCache) -> Optional[mx.array]:
        if not back:
            return c.state
        fed = c.window.shape[1] - c.state.shape[1]
        return c.state_after(fed, fed - back)

    return Snapshot(
        conv_states=tuple(conv_state(c) if isinstance(c, ConvCache) else None for c in cache),
        offsets=tuple(c.offset - back for c in cache),
        evictions=tuple(getattr(c, "evictions", 0) for c in cache),
    )


def restore(cache: list, snap: Snapshot) -> bool:
    """Roll the cache back to ``snap``; False (and nothing changed) if the KV window rolled since."""
    if any(getattr(c, "evictions", 0) != e for c, e in zip(cache, snap.evictions)):
        return False
    for c, state, offset in zip(cache, snap.conv_states, snap.offsets):
        if isinstance(c, ConvCache):
            c.state = state
        c.offset = offset
    return True


class PromptCache:
    """One conversation's hybrid state, the tokens it holds, and snapshots at chosen positions.

    A conv state cannot be trimmed, only restored, so prefix reuse needs a snapshot at (or before)
    the point where a new prompt departs from the old one: the engine takes them at message
    boundaries and just before the last prompt token.
    """

    max_snapshots = 8

    def __init__(self, model, max_kv_size: Optional[int] = None, keep: int = 4,
                 kv_bits: Optional[int] = None) -> None:
        self.model = model
        self.settings = dict(max_kv_size=max_kv_size, keep=keep, kv_bits=kv_bits)
        self.reset()

    def reset(self) -> None:
        self.layers = make_cache(self.model, **self.settings)
        self.tokens: list[int] = []
        self.snapshots: dict[int, Snapshot] = {}

    @property
    def max_kv_size(self) -> Optional[int]:
        return next((c.max_size for c in self.layers if isinstance(c, KVCache)), None)

    @property
    def rolled(self) -> bool:
        """Whether the KV window has dropped tokens: positions no longer map one to one to tokens."""
        return any(getattr(c, "evictions", 0) for c in self.layers)

    def take_snapshot(self, at: Optional[int] = None) -> None:
        """Snapshot the state after ``at`` tokens (default: all); a position inside the last call
        needs its conv layers to have kept their window."""
        at = len(self.tokens) if at is None else at
        self.snapshots[at] = snap = snapshot(self.layers, back=len(self.tokens) - at)
        # Evaluated now: unevaluated, a state would keep its whole prompt chunk's graph alive.
        mx.async_eval(*[a for a in snap.conv_states if a is not None])
        while len(self.snapshots) > self.max_snapshots:
            del self.snapshots[min(self.snapshots)]

    @property
    def nbytes(self) -> int:
        """Bytes held: KV buffers, conv states, and the conv states of snapshots."""
        arrays = {id(a): a for a in cache_arrays(self.layers)}
        arrays.update((id(a), a) for s in self.snapshots.values() for a in s.conv_states if a is not None)
        return sum(a.nbytes for a in arrays.values())

    def shrink(self) -> None:
        """Keep only the KV of the tokens held (for a cache stored and no longer written)."""
        for c in self.layers:
            if isinstance(c, KVCache):
                c.shrink()
        mx.eval(cache_arrays(self.layers))  # the copies made now, so the full buffers are freed now

    def branch(self, position: int) -> "PromptCache":
        """A new cache holding this one's state at the snapshot at ``position``: KV copied into buffers
        of its own, conv states shared (never mutated), earlier snapshots carried over."""
        snap = self.snapshots[position]
        new = PromptCache.__new__(PromptCache)
        new.model, new.settings = self.model, dict(self.settings)
        new.layers = []
        for c, state, offset in zip(self.layers, snap.conv_states, snap.offsets):
            if isinstance(c, KVCache):
                new.layers.append(c.copy_prefix(offset))
            else:
                conv = ConvCache()
                conv.state, conv.offset = state, offset
                new.layers.append(conv)
        new.tokens = self.tokens[:position]
        new.snapshots = {p: s for p, s in self.snapshots.items() if p <= position}
        return new

    def reuse(self, prompt: Sequence[int]) -> int:
        """Bring the state to the longest reusable prefix of ``prompt``; return its length.

        At least one prompt token is always left to feed, since its logits start generation.
        """
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        limit = min(common, len(prompt) - 1)
        if limit == len(self.tokens):
            return limit
        for position in sorted((p for p in self.snapshots if p <= limit), reverse=True):
            if restore(self.layers, self.snapshots[position]):
                self.tokens = self.tokens[:position]
                self.snapshots = {p: s for p, s in self.snapshots.items() if p <= position}
                return position
        self.reset()
        return 0


def cache_arrays(layers: list) -> list:
    """The arrays that hold the state, to evaluate after a prefill chunk."""
    out = []
    for c in layers:
        if isinstance(c, KVCache):
            out.extend(c.keys + c.values if c.keys is not None else ())
        elif c.state is not None:
            out.append(c.state)
    return out


@dataclass
class Rows:
    """One layer's caches for several sequences fed in one forward pass: the pass's tokens are the
    rows' tokens end to end, ``lengths[i]`` of them for ``caches[i]``. No padding exists to leak."""

    caches: list
    lengths: list


def split_rows(x: mx.array) -> list[mx.array]:
    """``x``'s rows (axis 0) as arrays of one row each, in few ops: ``mx.split`` is one op for fewer
    than 10 parts but a slice per part beyond, so blocks of 9 are split first (16 rows: 3 ops)."""
    n = x.shape[0]
    if n == 1:
        return [x]
    if n < 10:
        return mx.split(x, n)
    return [row for block in mx.split(x, list(range(9, n, 9))) for row in split_rows(block)]


def batch_rows(row_layers: Sequence[list], lengths: Sequence[int]) -> list:
    """Per layer, the ``Rows`` of several sequences' caches (``row_layers[i]`` is row i's cache list)."""
    return [Rows([layers[j] for layers in row_layers], list(lengths)) for j in range(len(row_layers[0]))]


class PrefixCache:
    """States of finished requests (and of running ones at message boundaries), kept so that later
    requests starting with the same tokens (a system prompt, the earlier turns of a conversation) skip
    prefilling them.

    Reuse ends at a snapshot, since a conv state cannot be trimmed: the engine snapshots at message
    boundaries and at the end of each prompt. Entries are never written again once stored (a reuse
    copies the KV prefix out), so their KV buffers are cut to the tokens they hold, and the least
    recently used go first beyond ``max_bytes``.

    A server's cache holds hundreds of entries, so none is scanned: each entry's snapshots and its end
    are indexed by a hash of the tokens before them, and a lookup hashes its prompt's prefixes once and
    tries only the positions where some entry has a snapshot, longest first (a hit is then compared
    token by token).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.inserts = 0  # entries stored so far: whether a lookup could find more than last time
        # key → (tokens, cache, bytes, the snapshot positions indexed)
        self._entries: OrderedDict[int, tuple[np.ndarray, PromptCache, int, tuple]] = OrderedDict()
        self._snapshots: dict[tuple, set[int]] = {}  # (settings, position, prefix hash) → entries
        self._ends: dict[tuple, set[int]] = {}  # (settings, length, hash of all tokens) → entries
        self._positions: Counter = Counter()  # snapshot positions over all entries
        self._lengths: Counter = Counter()  # entry lengths

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int], settings: dict, beyond: int = 0) -> Optional[PromptCache]:
        """A new cache at the longest stored prefix of ``tokens`` that ends at a snapshot (leaving at
        least one token to feed) past position ``beyond``, or None."""
        query = np.asarray(tokens, dtype=np.int64)
        hashes, kind = _prefix_hashes(query), _settings_key(settings)
        for position in sorted((p for p in self._positions if beyond < p < len(query)), reverse=True):
            for key in self._snapshots.get((kind, position, int(hashes[position - 1])), ()):
                if np.array_equal(self._entries[key][0][:position], query[:position]):
                    self._entries.move_to_end(key)
                    return self._entries[key][1].branch(position)
        return None

    def insert(self, cache: PromptCache) -> None:
        """Keep ``cache`` (which the caller gives up). Entries it extends are merged into it."""
        if cache.rolled or not cache.tokens:
            return
        ids = np.asarray(cache.tokens, dtype=np.int64)
        hashes, kind = _prefix_hashes(ids), _settings_key(cache.settings)
        for length in [n for n in self._lengths if n <= len(ids)]:
            for key in list(self._ends.get((kind, length, int(hashes[length - 1])), ())):
                old_ids, old, _, _ = self._entries[key]
                if np.array_equal(ids[:length], old_ids):
                    for position, snap in old.snapshots.items():
                        cache.snapshots.setdefault(position, snap)
                    self._remove(key)
        cache.shrink()
        size = cache.nbytes
        if size > self.max_bytes:
            return
        key, positions = id(cache), tuple(p for p in cache.snapshots if 0 < p <= len(ids))
        self._entries[key] = (ids, cache, size, positions)
        for position in positions:
            self._snapshots.setdefault((kind, position, int(hashes[position - 1])), set()).add(key)
            self._positions[position] += 1
        self._ends.setdefault((kind, len(ids), int(hashes[-1])), set()).add(key)
        self._lengths[len(ids)] += 1
        self.nbytes += size
        self.inserts += 1
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def clear(self) -> None:
        """Drop every entry, freeing its memory."""
        self._entries.clear()
        self._snapshots.clear()
        self._ends.clear()
        self._positions.clear()
        self._lengths.clear()
        self.nbytes = 0

    def _remove(self, key: int) -> None:
        ids, cache, size, positions = self._entries.pop(key)
        hashes, kind = _prefix_hashes(ids), _settings_key(cache.settings)
        for position in positions:
            _discard(self._snapshots, (kind, position, int(hashes[position - 1])), key)
            _uncount(self._positions, position)
        _discard(self._ends, (kind, len(ids), int(hashes[-1])), key)
        _uncount(self._lengths, len(ids))
        self.nbytes -= size


_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: its powers modulo 2**64 never vanish
_hash_powers = np.ones(1, np.uint64)


def _prefix_hashes(ids: np.ndarray) -> np.ndarray:
    """``h[i]``: a hash of ``ids[: i + 1]`` (the tokens weighted by powers of an odd 64-bit number,
    summed modulo 2**64), for all ``i`` in one pass."""
    global _hash_powers
    n = len(ids)
    if len(_hash_powers) < n:  # grown to twice the longest prompt seen
        _hash_powers = np.cumprod(np.r_[np.uint64(1), np.full(2 * n - 1, _HASH_BASE, np.uint64)], dtype=np.uint64)
    return np.cumsum((ids.astype(np.uint64) + np.uint64(1)) * _hash_powers[:n], dtype=np.uint64)


def _settings_key(settings: dict) -> tuple:
    return tuple(sorted(settings.items()))


def _discard(index: dict, key: tuple, entry: int) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(entry)
        if not members:
            del index[key]


def _uncount(counter: Counter, value: int) -> None:
    counter[value] -= 1
    if counter[value] <= 0:
        del counter[value]
