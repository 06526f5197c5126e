"""Attention of a decode step: one product per key/value head for all the query heads it serves.

torch's CPU attention kernel works query head by query head, so in a decode step (one new token
per row) a key/value head shared by ``g`` query heads is read ``g`` times. Stacking those ``g``
queries as the rows of one product reads it once: Falcon-7B's 71 query heads share one key/value
head, and its decode attention runs ~2.5x faster this way. Everything else (several new tokens,
half precision, a causal flag, few query heads per key/value head) goes to
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A float32 CPU decode step takes the grouped products when at least this many query heads share
# each key/value head; with fewer (SmolLM2's 3, Llama 3's 4) the kernel is as fast.
GROUPED_MIN_HEADS = 8


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
    enable_gqa=True)``: ``q [B, heads, T, d]``, ``k, v [B, kv_heads, S, d]`` (query head ``h``
    reads key/value head ``h // (heads / kv_heads)``), ``mask`` bool (True = may attend) or
    additive, ``[B|1, 1|heads, T, S]``. Returns ``[B, heads, T, d]``."""
    batch, heads, steps, dim = q.shape
    group = heads // k.shape[1]
    if (
        steps != 1
        or is_causal
        or group < GROUPED_MIN_HEADS
        or q.dtype != torch.float32
        or q.device.type != "cpu"
    ):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=group > 1
        )
    grouped = q.reshape(batch, k.shape[1], group, dim)  # a key/value head's queries as rows
    scores = torch.matmul(grouped, k.transpose(-1, -2)).mul_(dim**-0.5)  # [B, kv_heads, g, S]
    if mask is not None:
        if mask.shape[1] != 1:  # a mask per query head: the same grouping
            mask = mask.reshape(mask.shape[0], k.shape[1], group, mask.shape[-1])
        if mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask, float("-inf"))
        else:
            scores = scores.add_(mask)
    return torch.matmul(scores.softmax(-1), v).view(batch, heads, 1, dim)
