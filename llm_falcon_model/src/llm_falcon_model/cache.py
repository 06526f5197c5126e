"""The KV cache of one part: fixed-size buffers at the KV-head count, one per layer.

Falcon-7B computes a single key/value head shared by its 71 query heads; Falcon-40B computes 8
shared by 128. The cache stores exactly those heads -- ``[batch, num_kv_heads, max_len, head_dim]``
per layer for K and for V -- and attention broadcasts them to the query heads. So a token costs
``2 x layers x num_kv_heads x head_dim x dtype size`` bytes, never the query-head count.

Besides the per-layer buffers the cache keeps, per slot, whether it holds a real token (left
padding leaves some slots empty) and that token's position (how many real tokens its row had
before it). Positions therefore follow the padding mask, never the slot index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FalconModelError


class LayerCache:
    """Keys and values of one layer, ``[batch, num_kv_heads, max_len, head_dim]`` each."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k
        self.v = v

    def update(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (``[B, kv, T, d]``) at slots ``start..start+T``; return ``0..start+T``."""
        batch, _, steps, _ = k.shape
        stop = start + steps
        self.k[:batch, :, start:stop] = k
        self.v[:batch, :, start:stop] = v
        return self.k[:batch, :, :stop], self.v[:batch, :, :stop]

    def nbytes(self) -> int:
        """Bytes held by this layer's two buffers."""
        return self.k.nbytes + self.v.nbytes


@dataclass(frozen=True)
class Step:
    """Where one forward call's ``T`` new tokens go and what they may attend to.

    ``key_real`` is ``[B, start+T]`` (True where a key slot holds a real token), ``key_positions``
    the matching positions (0 for padding) and ``positions`` ``[B, T]`` those of the new tokens.
    ``padded`` says whether any slot so far is padding (when False, plain causal attention does).
    """

    start: int
    key_real: torch.Tensor
    key_positions: torch.Tensor
    positions: torch.Tensor
    padded: bool


class KVCache:
    """Fixed-size K/V buffers for the layers of one part, plus the slot bookkeeping they share.

    Make one with ``part.new_cache(batch_size, max_len)``; every forward with it appends ``T``
    slots for every row. ``layers[i]`` is the :class:`LayerCache` of the part's local layer ``i``.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise FalconModelError(
                f"a cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}"
            )
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.layers = [
            LayerCache(
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(num_layers)
        ]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.real = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.padded = False

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers of every layer (bookkeeping not counted)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> int:
        """K/V bytes one token slot costs across this cache's layers."""
        return self.nbytes() // (self.batch_size * self.max_len)

    def reset(self) -> None:
        """Forget every position; the buffers are reused (stale slots are never attended)."""
        self.length = 0
        self.real.zero_()
        self.positions.zero_()
        self.seen.zero_()
        self.padded = False

    def plan(self, mask: torch.Tensor) -> Step:
        """The :class:`Step` for new tokens with padding ``mask`` (``[B, T]`` bool).

        Raises :class:`FalconModelError` when the batch or the sequence does not fit.
        """
        batch, steps = mask.shape
        if batch > self.batch_size:
            raise FalconModelError(f"batch of {batch} is larger than the cache ({self.batch_size})")
        start, stop = self.length, self.length + steps
        if stop > self.max_len:
            raise FalconModelError(
                f"{stop} positions do not fit a cache of max_len {self.max_len} "
                f"({start} cached + {steps} new)"
            )
        positions = new_positions(mask, self.seen[:batch])
        # Writing the new slots before the forward is safe: `length` only moves in `advance`.
        self.real[:batch, start:stop] = mask
        self.real[batch:, start:stop] = False
        self.positions[:batch, start:stop] = positions
        padded = self.padded or not bool(mask.all())
        return Step(
            start, self.real[:batch, :stop], self.positions[:batch, :stop], positions, padded
        )

    def advance(self, step: Step) -> None:
        """Commit a finished forward: its slots now count as cached."""
        batch, steps = step.positions.shape
        self.seen[:batch] += self.real[:batch, step.start : step.start + steps].sum(-1)
        self.length = step.start + steps
        # rows beyond this batch got empty slots: a later, larger batch sees them as padding
        self.padded = step.padded or batch < self.batch_size


def new_positions(mask: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Position of each new token: real tokens before it in its row (0 for padding)."""
    positions = seen[:, None] + mask.long().cumsum(-1) - 1
    return torch.where(mask, positions, 0)


def uncached_step(mask: torch.Tensor) -> Step:
    """The :class:`Step` of a forward without a cache: the keys are the new tokens themselves."""
    positions = new_positions(mask, torch.zeros_like(mask[:, 0], dtype=torch.long))
    return Step(0, mask, positions, positions, not bool(mask.all()))
