"""Positions from the padding mask and the cache, and which keys each new token may see.

A row's tokens get positions 0, 1, 2, ... counting only its real tokens, whatever slot they sit
in: a left-padded row (or a row that joined a running batch right-aligned) computes exactly what
it would alone. A padding token gets position 0; nothing real ever attends to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class Slots:
    """Where one forward call's ``T`` new tokens go and what they may attend to.

    ``start`` is the cache slot of the first new token (0 without a cache); ``positions``
    ``[B, T]`` their positions; ``key_real`` ``[B, start + T]`` says which key slots hold real
    tokens (the new ones included); ``padded`` whether any of those slots is padding (when False,
    plain causal attention is the same thing).
    """

    start: int
    positions: torch.Tensor
    key_real: torch.Tensor
    padded: bool

    @property
    def steps(self) -> int:
        """``T``, the number of new tokens per row."""
        return self.positions.shape[1]

    def key_positions(self) -> torch.Tensor:
        """``[B, start + T]``: each key slot's position (0 for padding), as ALiBi needs them."""
        counts = self.key_real.long().cumsum(-1) - 1
        return torch.where(self.key_real, counts, 0)


def check_mask(
    mask: torch.Tensor | None, batch: int, steps: int, device: torch.device
) -> torch.Tensor:
    """The padding mask as bool ``[B, T]`` on ``device`` (True = real token); None = all real.

    Raises :class:`InputError` naming ``mask`` when it is not a ``[B, T]`` tensor of bools or of
    integers 0 and 1.
    """
    if mask is None:
        return torch.ones(batch, steps, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, steps):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"mask must be a [B, T] = [{batch}, {steps}] tensor, got {shape}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise InputError(f"mask must be bool or integer 0/1 (1 = real token), got {mask.dtype}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InputError("mask values must be 0 (padding) or 1 (real token)")
        mask = mask != 0
    return mask.to(device)


def new_positions(mask: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: each new token's position, the real tokens before it in its row (``seen[b]``
    of them cached); 0 for padding."""
    positions = seen[:, None] + mask.long().cumsum(-1) - 1
    return torch.where(mask, positions, 0)


def uncached_slots(mask: torch.Tensor) -> Slots:
    """The :class:`Slots` of a forward without a cache: the keys are the new tokens themselves."""
    positions = new_positions(
        mask, torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    )
    return Slots(0, positions, mask, not bool(mask.all()))


def allowed_keys(slots: Slots) -> torch.Tensor:
    """``[B, 1, T, S]`` bool: new token t (slot ``start + t``) sees the real keys up to its slot.

    A padding token also sees itself, so no row of the softmax is empty (which would give NaN);
    what a padding token computes is never seen by a real one.
    """
    device = slots.key_real.device
    query_slot = slots.start + torch.arange(slots.steps, device=device)[:, None]  # [T, 1]
    key_slot = torch.arange(slots.key_real.shape[1], device=device)[None, :]  # [1, S]
    allowed = (key_slot <= query_slot) & slots.key_real[:, None, :]  # [B, T, S]
    return (allowed | (key_slot == query_slot))[:, None]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` as the additive float mask SDPA would build from it: 0 or -inf.

    (SDPA converts a bool mask on every call; a part converts once per forward for all layers.)
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))
