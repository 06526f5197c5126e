"""Linears: packed equals unpacked; bias after the product; stale packs are dropped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_slice_core import Linears
from llm_slice_core.packing import drop_stale, pack


def layers(bias: bool) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(12, n, bias=bias).requires_grad_(False) for n in (8, 4, 4)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bias_after", [True, False])
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_packed_equals_the_layers_side_by_side(bias, bias_after, splits):
    group = Linears(*layers(bias), bias_after=bias_after)
    x, h = torch.randn(3, 12), torch.randn(3, 16)
    want = torch.cat([lin(x) for lin in group.linears], -1)
    torch.testing.assert_close(group(x, splits), want, atol=1e-6, rtol=0)
    group.pack()
    assert group.packed and group.weight_t.shape == (12, 16)
    torch.testing.assert_close(group(x, splits), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(group(x, splits, residual=h), want + h, atol=1e-6, rtol=0)


def test_bias_after_is_the_product_then_the_bias_bit_for_bit():
    (lin,) = layers(True)[:1]
    group = Linears(lin, bias_after=True)
    x = torch.randn(5, 12)
    assert torch.equal(group(x), x @ lin.weight.T + lin.bias)


def test_an_output_projection_keeps_its_layout_in_memory_of_its_own():
    lin = layers(True)[0]
    before = lin.weight.data_ptr()
    group = Linears(lin, transpose=False)
    group.pack()
    assert lin.weight.is_contiguous() and lin.weight.data_ptr() != before
    with pytest.raises(ValueError, match="single"):
        Linears(*layers(False), transpose=False)


def test_replaced_parameters_leave_a_stale_pack_that_is_dropped():
    group = Linears(*layers(True))
    module = nn.Module()
    module.q, module.k, module.v = group.linears
    module.group = group
    (found,) = pack(module)
    assert found is group and group.intact()
    module.q.weight = nn.Parameter(torch.zeros(8, 12), requires_grad=False)
    assert not group.intact()
    drop_stale([group])
    assert not group.packed
    x = torch.randn(2, 12)
    torch.testing.assert_close(group(x)[:, :8], module.q.bias.expand(2, 8), atol=0, rtol=0)
