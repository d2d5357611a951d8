"""The mixture sampler's keyed arithmetic: chain-hashed uint64 keys, a keyed Feistel permutation of
[0, n), and the stratified block layout of one set of weights (Stratum).

Apart from mixture.py, whose docstring gives the design, because these are pure functions of keys and
indices, with no files or manifest: each can be tested alone (a permutation is a permutation, counts
over whole blocks are exact) and reused (ngrams.py hashes words with mix64).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import numpy as np

from ..errors import UserError

_WBITS = 24  # weights are quantized to multiples of 2^-24, so apportionment is exact integer arithmetic
_WONE = 1 << _WBITS
_BLOCK_MIN = 1024
_BLOCK_MAX = 1 << 20
_ROUNDS = 4
_CACHE_BLOCKS = 64
M64 = (1 << 64) - 1

_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast bijective scrambler of uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


def key(*parts: np.ndarray | int) -> np.ndarray:
    """Chain-hash integers (or arrays of them) into one uint64 key per element."""
    with np.errstate(over="ignore"):
        k = np.zeros(1, dtype=np.uint64)
        for part in parts:
            p = np.asarray(part)
            p = p.astype(np.uint64) if p.dtype != object else np.asarray(int(p) & M64, dtype=np.uint64)
            k = mix64(k ^ mix64(p + np.uint64(0x9E3779B97F4A7C15)))
        return k


def name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def feistel(x: np.ndarray, n: int, key: np.ndarray) -> np.ndarray:
    """A keyed permutation of [0, n) applied to x (each element with its own key), in O(1) memory.

    A Feistel network permutes [0, 2^bits) for the smallest 2^bits >= n (halves of unequal width when
    bits is odd, swapping each round); cycle walking (re-applying it until the value lands below n)
    restricts that to a permutation of [0, n), in under two walks on average.
    """
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(x)
    bits = max(2, (n - 1).bit_length())
    widths = (bits - bits // 2, bits // 2)  # (left, right)
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), x.shape)
    with np.errstate(over="ignore"):
        round_keys = [mix64(key ^ np.uint64((r + 1) * 0xD1B54A32D192ED03 & M64)) for r in range(_ROUNDS)]

        masks = (np.uint64((1 << widths[0]) - 1), np.uint64((1 << widths[1]) - 1))
        shifts = (np.uint64(widths[0]), np.uint64(widths[1]))

        def rounds(v: np.ndarray, sel: np.ndarray | slice) -> np.ndarray:
            left, right = v >> shifts[1], v & masks[1]
            for r, rk in enumerate(round_keys):  # (L, R) -> (R, L ^ F(R)): invertible whatever F is
                left, right = right, left ^ (mix64(right ^ rk[sel]) & masks[r % 2])
            return (left << shifts[_ROUNDS % 2 ^ 1]) | right

        y = rounds(x, slice(None))
        out = np.flatnonzero(y >= np.uint64(n))
        while out.size:
            y[out] = rounds(y[out], out)
            out = out[y[out] >= np.uint64(n)]
    return y


class Stratum:
    """One set of weights laid out over consecutive samples: the stratified block layout of one stage,
    indexed by the sample's position within that stage."""

    def __init__(self, names: list[str], weights: np.ndarray, block_seed: np.ndarray) -> None:
        self.names = names
        self.weights = weights
        self.wq = _quantize(weights)
        self.block = self._block_size()
        self.block_seed = block_seed
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        # the prefetch thread and the step log both resolve samples; the cache is not safe to share unlocked
        self._lock = threading.Lock()

    def _block_size(self) -> int:
        """Samples per stratification block: enough that every drawn source gets at least 2 in each."""
        block = max(_BLOCK_MIN, math.ceil(2 * _WONE / int(self.wq[self.wq > 0].min())))
        if block > _BLOCK_MAX:
            small = self.names[int(np.argmin(np.where(self.weights > 0, self.weights, np.inf)))]
            raise UserError(
                f"the weight of source {small!r} is under {2 / _BLOCK_MAX:.1g} of the total, too small to "
                f"stratify; raise it or drop the source"
            )
        return block

    def cum(self, blocks: np.ndarray) -> np.ndarray:
        """Samples of each source among the first blocks*B samples: (len(blocks), n_sources)."""
        n = blocks.astype(np.int64) * self.block
        prod = n[:, None] * self.wq[None, :]
        floor, frac = prod >> _WBITS, prod & (_WONE - 1)
        spare = n - floor.sum(axis=1)  # below the count of non-zero remainders, so no unweighted source gets one
        order = np.argsort(-frac, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), axis=1)
        return floor + (rank < spare[:, None])

    def layout(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """block_layouts through a small cache: training reads consecutive indices, so one block's
        layout serves many batches. Pure, so caching cannot change a sample."""
        if len(blocks) == 0:
            return np.zeros((0, self.block), np.int64), np.zeros((0, self.block), np.int64)
        with self._lock:
            missing = [int(b) for b in blocks if int(b) not in self._cache]
            if missing:
                src, ordinal = self.block_layouts(np.array(missing, dtype=np.int64))
                for j, b in enumerate(missing):
                    self._cache[b] = (src[j], ordinal[j])
            pairs = [self._cache[int(b)] for b in blocks]
            while len(self._cache) > max(_CACHE_BLOCKS, len(blocks)):
                self._cache.popitem(last=False)
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def block_layouts(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each block: the source of each of its B positions, and that sample's ordinal within its
        source. Sources get their apportioned counts in keyed pseudo-random positions; a source's
        ordinals increase with the position, so its samples run in order and an epoch ends before
        the next begins."""
        before = self.cum(blocks)
        count = self.cum(blocks + 1) - before
        bounds = np.cumsum(count, axis=1)  # (U, k): slot ranges of each source
        u, b, k = len(blocks), self.block, len(self.names)
        keys = np.repeat(key(self.block_seed, blocks), b)
        slots = feistel(np.tile(np.arange(b), u), b, keys).astype(np.int64).reshape(u, b)
        row = np.arange(u)[:, None]
        src = np.searchsorted((bounds + row * (b + 1)).ravel(), (slots + row * (b + 1)).ravel(), side="right")
        src = src.reshape(u, b) - row * k
        order = np.argsort(src, axis=1, kind="stable")  # grouped by source, positions ascending
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(b), (u, b)), axis=1)
        first = np.take_along_axis(bounds - count, src, axis=1)  # start of each position's group
        ordinal = np.take_along_axis(before, src, axis=1) + rank - first
        return src, ordinal

    def locate(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, ordinal within the source's draws in this stratum) of positions within it."""
        blocks, pos = np.divmod(local, self.block)
        uniq, inv = np.unique(blocks, return_inverse=True)
        src_at, ordinal_at = self.layout(uniq)
        return src_at[inv, pos], ordinal_at[inv, pos]

    def counts(self, n: int) -> np.ndarray:
        """Samples of each source among this stratum's first n positions."""
        full, rest = divmod(int(n), self.block)
        out = self.cum(np.array([full]))[0]
        if rest:
            src, _ = self.layout(np.array([full]))
            out = out + np.bincount(src[0, :rest], minlength=len(self.names))
        return out


def _quantize(w: np.ndarray) -> np.ndarray:
    """Weights as integers summing to exactly 2^24 (largest remainders get the spare units); a zero
    weight stays zero."""
    scaled = w * _WONE
    q = np.floor(scaled).astype(np.int64)
    order = np.argsort(-(scaled - q), kind="stable")
    order = order[w[order] > 0]
    spare = _WONE - int(q.sum())  # in [0, n) up to float rounding, which the loop absorbs
    for k in range(abs(spare)):
        q[order[k % len(order)] if spare > 0 else order[-1 - k % len(order)]] += 1 if spare > 0 else -1
    if q[w > 0].min() < 1:
        raise UserError(f"a mixture weight below 2^-{_WBITS} of the total cannot be sampled; raise it")
    return q
