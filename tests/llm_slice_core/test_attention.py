"""Decode attention as one product per key/value head equals torch's SDPA, every mask kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_slice_core import attend
from llm_slice_core.attention import GROUPED_MIN_HEADS


def inputs(batch: int, heads: int, kv_heads: int, steps: int, keys: int, seed: int = 0):
    """q ``[B, heads, T, 16]`` as a transposed view (as a projection gives it) and k, v views of
    a longer cache buffer (as a cache gives them)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, steps, heads, 16, generator=gen).transpose(1, 2)
    k = torch.randn(batch, kv_heads, keys + 5, 16, generator=gen)[:, :, :keys]
    v = torch.randn(batch, kv_heads, keys + 5, 16, generator=gen)[:, :, :keys]
    return q, k, v


def masks(batch: int, heads: int, keys: int) -> dict:
    """Each kind of mask a part passes: none, bool padding, additive padding, ALiBi per head."""
    allowed = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    allowed[1:, ..., :3] = False  # rows after the first are left-padded
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    slopes = torch.linspace(0.1, 1.0, heads)[None, :, None, None]
    alibi = torch.where(allowed, slopes * torch.arange(keys), torch.finfo(torch.float32).min)
    return {"none": None, "bool": allowed, "additive": additive, "alibi": alibi}


@pytest.mark.parametrize("kind", ["none", "bool", "additive", "alibi"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(71, 1), (16, 2), (8, 1), (9, 3), (4, 4)])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_attention_equals_sdpa(batch, heads, kv_heads, kind):
    q, k, v = inputs(batch, heads, kv_heads, 1, 11)
    mask = masks(batch, heads, 11)[kind]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = attend(q, k, v, mask)
    assert got.shape == (batch, heads, 1, 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_what_the_grouped_products_do_not_take_goes_to_sdpa(monkeypatch):
    """Several new tokens, a causal flag, half precision, few heads per group: SDPA itself."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    q, k, v = inputs(2, 16, 1, 1, 7)
    attend(q, k, v)
    assert calls == []  # 16 query heads on one key/value head, one token: the grouped products
    attend(*inputs(2, 16, 1, 3, 7))
    attend(q, k, v, is_causal=True)
    attend(q.bfloat16(), k.bfloat16(), v.bfloat16())
    attend(*inputs(2, GROUPED_MIN_HEADS - 1, 1, 1, 7))
    assert len(calls) == 4
