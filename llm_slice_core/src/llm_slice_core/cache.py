"""The KV cache of one part: fixed-size K/V buffers per layer plus the slot bookkeeping they share.

Buffers are ``[batch_size, kv_heads, max_len, head_dim]`` per layer for K and for V, at the
KV-head count (a grouped- or multi-query model never stores a key per query head). Every forward
with the cache appends ``T`` slots to every row in use; ``real[b, s]`` says whether slot ``s`` of
row ``b`` holds a real token and ``seen[b]`` counts row ``b``'s real tokens, so the next one gets
position ``seen[b]``. The cache owns this bookkeeping: a part asks :meth:`KVCache.plan` where its
new tokens go and commits with :meth:`KVCache.advance` once every layer has run.

Rows join and leave a running batch (a server decoding many requests as one batch):
:meth:`KVCache.keep_rows` keeps some rows, in a given order, at the front; :meth:`KVCache.join`
appends another cache's rows. Rows are right-aligned: the shorter side gets padding slots on the
left, which nothing attends to, and positions come from ``seen``, so each row still computes what
it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CacheError
from .positions import Slots, new_positions


@dataclass
class LayerKV:
    """Keys and values of one layer, ``[batch_size, kv_heads, max_len, head_dim]`` each."""

    k: torch.Tensor
    v: torch.Tensor

    def update(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``[B, kv_heads, T, d]`` at slots ``start .. start+T``; return the
        keys and values of slots ``0 .. start+T`` of those rows (views, never expanded)."""
        batch, stop = k.shape[0], start + k.shape[2]
        self.k[:batch, :, start:stop] = k
        self.v[:batch, :, start:stop] = v
        return self.k[:batch, :, :stop], self.v[:batch, :, :stop]


def cache_bytes(
    num_layers: int,
    batch_size: int,
    max_len: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    """The exact bytes a :class:`KVCache` of these sizes allocates (buffers and bookkeeping)."""
    buffers = 2 * num_layers * batch_size * kv_heads * max_len * head_dim * dtype.itemsize
    return buffers + batch_size * max_len * torch.bool.itemsize + batch_size * torch.long.itemsize


class KVCache:
    """K/V buffers for the layers of one part and one batch, and the bookkeeping of their slots.

    Make one with ``part.new_cache(batch_size, max_len)``. ``layers[i]`` is the :class:`LayerKV`
    of the part's local layer slot ``i``; ``rows`` rows are in use (a forward of ``B`` rows uses
    ``max(rows, B)``), ``length`` slots are filled in each of them.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        owner: object = None,
    ) -> None:
        if batch_size < 1 or max_len < 1:
            raise CacheError(
                f"a cache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}"
            )
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.layers = [
            LayerKV(
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(num_layers)
        ]
        self.batch_size, self.max_len = batch_size, max_len
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.rows = 0
        self.length = 0
        self.real = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.device = self.real.device
        self.owner = owner  # what made it (a part checks its caches are its own)
        self.padded = False
        self.joined = False  # True once join()ed into another cache: then unusable

    def nbytes(self) -> int:
        """Bytes this cache allocated (K/V buffers and bookkeeping): ``part.cache_bytes``."""
        buffers = sum(kv.k.nbytes + kv.v.nbytes for kv in self.layers)
        return buffers + self.real.nbytes + self.seen.nbytes

    def bytes_per_token(self) -> int:
        """K/V bytes one slot of one row costs across this cache's layers."""
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * self.dtype.itemsize

    def reset(self) -> None:
        """Forget every row and position; the buffers are reused (stale slots are never seen)."""
        self._check_usable()
        self.rows = self.length = 0
        self.real.zero_()
        self.seen.zero_()
        self.padded = False

    def plan(self, mask: torch.Tensor) -> Slots:
        """The :class:`Slots` of new tokens with padding ``mask`` (bool ``[B, T]``).

        Rows ``B..rows-1`` (a smaller batch than before) get padding slots. Nothing counts as
        cached before :meth:`advance`. Raises :class:`CacheError` when the batch or the sequence
        does not fit.
        """
        self._check_usable()
        batch, steps = mask.shape
        if batch > self.batch_size:
            raise CacheError(
                f"a batch of {batch} rows is larger than the cache's batch_size {self.batch_size}"
            )
        start, stop = self.length, self.length + steps
        if stop > self.max_len:
            raise CacheError(
                f"sequence too long: {start} cached + {steps} new positions exceed the cache's "
                f"max_len {self.max_len}"
            )
        positions = new_positions(mask, self.seen[:batch])
        # Writing the new slots before the forward is safe: `length` only moves in `advance`.
        self.real[:batch, start:stop] = mask
        self.real[batch:, start:stop] = False
        # a row new to the batch has padding slots before `start`
        padded = self.padded or (start > 0 and batch > self.rows) or not bool(mask.all())
        return Slots(start, positions, self.real[:batch, :stop], padded)

    def advance(self, slots: Slots) -> None:
        """Commit a finished forward: its slots now count as cached."""
        batch, stop = slots.key_real.shape[0], slots.start + slots.steps
        self.seen[:batch] += self.real[:batch, slots.start : stop].sum(-1)
        self.length = stop
        self.padded = slots.padded or batch < self.rows  # rows left out got padding slots
        self.rows = max(self.rows, batch)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep these rows, in this order, at the front; the others leave the batch.

        Leading slots that no kept row uses are dropped (so a long-finished row's history does
        not eat ``max_len``). Copies only the kept rows' filled slots.
        """
        self._check_usable()
        rows = [int(r) for r in rows]
        if len(set(rows)) != len(rows) or any(not 0 <= r < self.rows for r in rows):
            raise CacheError(
                f"rows must be distinct indices of the {self.rows} rows in use, got {rows}"
            )
        if not rows:
            self.reset()
            return
        kept = len(rows)
        index = torch.tensor(rows, device=self.real.device)
        used = self.real[index, : self.length].any(0)
        first = int(used.int().argmax()) if bool(used.any()) else self.length
        length = self.length - first
        for kv in self.layers:
            kv.k[:kept, :, :length] = kv.k[index, :, first : self.length]
            kv.v[:kept, :, :length] = kv.v[index, :, first : self.length]
        self.real[:kept, :length] = self.real[index, first : self.length]
        self.real[kept:] = False
        self.seen[:kept] = self.seen[index].clone()
        self.seen[kept:] = 0
        self.rows, self.length = kept, length
        self.padded = not bool(self.real[:kept, :length].all())

    def join(self, other: KVCache) -> None:
        """Append ``other``'s rows after this cache's rows; ``other`` is unusable afterwards.

        Both sides are right-aligned to the longer one's length: the shorter side's rows move
        right and get padding slots on the left. Raises :class:`CacheError` when ``other`` was
        made for another part (layers, heads, dtype, device) or the rows or slots do not fit.
        """
        self._check_usable()
        self._check_joinable(other)
        mine = self.length if self.rows else 0
        length = max(mine, other.length)
        if self.rows + other.rows > self.batch_size or length > self.max_len:
            raise CacheError(
                f"cannot join {other.rows} rows of {other.length} slots to {self.rows} rows of "
                f"{mine}: the cache holds {self.batch_size} rows of max_len {self.max_len}"
            )
        if mine < length and self.rows:
            self._shift_right(length - mine)
        top, end = self.rows, self.rows + other.rows
        left = length - other.length
        for kv, theirs in zip(self.layers, other.layers, strict=True):
            kv.k[top:end, :, left:length] = theirs.k[: other.rows, :, : other.length]
            kv.v[top:end, :, left:length] = theirs.v[: other.rows, :, : other.length]
        self.real[top:end, :left] = False
        self.real[top:end, left:length] = other.real[: other.rows, : other.length]
        self.seen[top:end] = other.seen[: other.rows]
        self.rows, self.length = end, length
        self.padded = not bool(self.real[:end, :length].all())
        other.layers, other.joined = [], True  # its buffers are released

    def _shift_right(self, by: int) -> None:
        rows, length = self.rows, self.length
        for kv in self.layers:
            kv.k[:rows, :, by : by + length] = kv.k[:rows, :, :length].clone()
            kv.v[:rows, :, by : by + length] = kv.v[:rows, :, :length].clone()
        self.real[:rows, by : by + length] = self.real[:rows, :length].clone()
        self.real[:rows, :by] = False
        self.length = length + by

    def _check_joinable(self, other: KVCache) -> None:
        if other is self:
            raise CacheError("a cache cannot join itself: other must be another KVCache")
        if not isinstance(other, KVCache):
            raise CacheError(f"other must be another KVCache, got {type(other).__name__}")
        other._check_usable()
        mine = (len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)
        theirs = (len(other.layers), other.kv_heads, other.head_dim, other.dtype, other.device)
        if mine != theirs or other.owner is not self.owner:
            raise CacheError(
                f"other was made by another part: (layers, kv_heads, head_dim, dtype, device) "
                f"{theirs} vs this cache's {mine}"
            )

    def _check_usable(self) -> None:
        if self.joined:
            raise CacheError("this cache was joined into another cache and holds nothing now")
