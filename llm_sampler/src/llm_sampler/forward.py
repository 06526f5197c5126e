"""How llm_sampler calls a forward function, and how it lays out padded batches.

A forward function is ``forward_func(input_ids) -> logits`` or ``forward_func(input_ids, mask)
-> logits``: ``input_ids`` is ``LongTensor[B, T]``, ``logits`` is ``[B, T, V]`` (one position per
input token). ``mask`` is ``BoolTensor[B, T]`` for the same T positions, True on real tokens and
False on left padding — the convention of this repo's model slices. The sampler passes a mask
only to functions whose signature can take a second positional argument (see
:func:`accepts_mask`); a function without one is only ever given batches without padding.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence

import torch

from .errors import SamplerError

ForwardFunc = Callable[..., torch.Tensor]
"""``(input_ids: LongTensor[B, T][, mask: BoolTensor[B, T]]) -> logits: Tensor[B, T, V]``."""

Prompts = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def accepts_mask(forward_func: ForwardFunc) -> bool:
    """True when ``forward_func`` can be called as ``forward_func(input_ids, mask)``.

    For a ``torch.nn.Module`` the signature of its ``forward`` decides (``Module.__call__``
    itself takes ``*args``).
    """
    target = forward_func.forward if isinstance(forward_func, torch.nn.Module) else forward_func
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature: call them with ids only
        return False
    try:
        signature.bind(None, None)
    except TypeError:
        return False
    return True


def call_forward(
    forward_func: ForwardFunc,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Call ``forward_func`` (with ``mask`` unless it is None) and check it returned [B, T, V]."""
    with torch.no_grad():
        logits = forward_func(input_ids) if mask is None else forward_func(input_ids, mask)
    if not isinstance(logits, torch.Tensor):
        raise SamplerError(
            f"forward_func must return a logits tensor [B, T, V], got {type(logits).__name__} "
            "(wrap a Hugging Face model with llm_sampler.HFCausalLM)"
        )
    batch, length = input_ids.shape
    if logits.dim() != 3 or logits.shape[0] != batch or logits.shape[1] != length:
        raise SamplerError(
            f"forward_func returned logits of shape {tuple(logits.shape)} for input_ids of shape "
            f"{(batch, length)}; expected [{batch}, {length}, V], one position per input token"
        )
    return logits


def prompt_rows(
    prompts: Prompts, mask: torch.Tensor | None = None, *, what: str = "prompt"
) -> list[list[int]]:
    """Normalise prompts to a list of non-empty token-id lists.

    Accepts a ``LongTensor[B, T]`` (optionally with a ``mask[B, T]`` marking real tokens, left or
    right padding), a 1-D tensor or a flat list of ints (one prompt), or a list of lists.
    """
    if isinstance(prompts, torch.Tensor):
        rows = _tensor_rows(prompts, mask)
    else:
        if mask is not None:
            raise SamplerError("prompt_mask is only accepted with a prompts tensor")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise SamplerError(f"prompts must be token ids, got {type(prompts).__name__}")
        if len(prompts) > 0 and all(_is_token(t) for t in prompts):
            rows = [[int(t) for t in prompts]]
        else:
            rows = [_token_list(row, f"{what} {i}") for i, row in enumerate(prompts)]
    if not rows:
        raise SamplerError(f"no {what}s given: pass at least one {what}")
    for i, row in enumerate(rows):
        if not row:
            raise SamplerError(f"{what} {i} is empty; it needs at least one token")
    return rows


def pad_rows(
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    left: bool,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows to one length: ``ids LongTensor[B, T]`` and ``mask BoolTensor[B, T]``."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        start = length - len(row) if left else 0
        ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, start : start + len(row)] = True
    return ids.to(device), mask.to(device)


def is_token_sequence(value: object) -> bool:
    """True for a list/tuple/tensor of token ids (not a bare int, not a string)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 1
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def check_token_id(name: str, value: int) -> int:
    """Validate a non-negative token id setting such as ``pad_token_id``."""
    if not _is_token(value):
        raise SamplerError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _tensor_rows(prompts: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    if prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
        raise SamplerError(f"prompt token ids must be an integer tensor, got {prompts.dtype}")
    if prompts.dim() == 1:
        prompts = prompts.unsqueeze(0)
        mask = mask.unsqueeze(0) if mask is not None else None
    if prompts.dim() != 2:
        raise SamplerError(f"prompts tensor must be [B, T] or [T], got {tuple(prompts.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(prompts.shape):
        raise SamplerError(
            f"prompt_mask shape {tuple(mask.shape)} differs from prompts {tuple(prompts.shape)}"
        )
    if (prompts < 0).any():
        raise SamplerError("prompt token ids must be >= 0")
    if mask is None:
        return prompts.tolist()
    keep = mask.bool().cpu()
    return [row[m].tolist() for row, m in zip(prompts.cpu(), keep, strict=True)]


def _token_list(row: object, name: str) -> list[int]:
    if isinstance(row, torch.Tensor):
        row = row.tolist()
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
        raise SamplerError(f"{name} must be a sequence of token ids, got {row!r}")
    if not all(_is_token(t) for t in row):
        raise SamplerError(f"{name} must hold only int token ids >= 0, got {list(row)!r}")
    return [int(t) for t in row]


def _is_token(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
