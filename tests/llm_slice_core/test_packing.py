"""Linears: packed equals unpacked; bias after the product; stale packs are dropped; a pack
exported and adopted again without a copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_slice_core import Linears, WeightsError, kernel
from llm_slice_core.packing import drop_stale, named_groups, pack


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
    unbiased = nn.Linear(12, 8, bias=False).requires_grad_(False)
    unbiased.weight = lin.weight  # the same product (torch.mm for 1 row, oneDNN for 5) unbiased
    for rows in (1, 5):
        x = torch.randn(rows, 12)
        assert torch.equal(group(x), Linears(unbiased)(x) + lin.bias)


def test_an_output_projection_keeps_its_layout_in_memory_of_its_own(without_kernel):
    lin = layers(True)[0]
    before = lin.weight.data_ptr()
    group = Linears(lin, transpose=False)
    group.pack()
    assert lin.weight.is_contiguous() and lin.weight.data_ptr() != before
    with pytest.raises(ValueError, match="single"):
        Linears(*layers(False), transpose=False)


def test_with_the_decode_kernel_an_output_projection_is_stored_transposed_too():
    assert kernel.available(), "the decode kernel could not be built here (see the log)"
    lin = layers(True)[0]
    group = Linears(lin, transpose=False)
    group.pack()
    assert group.transpose and set(group.stored_shapes()) == {"weight_t", "bias"}
    assert group.weight_t.is_contiguous() and lin.weight.data_ptr() == group.weight_t.data_ptr()
    x = torch.randn(3, 12)
    torch.testing.assert_close(group(x), x @ lin.weight.t() + lin.bias, atol=1e-6, rtol=0)


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


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transpose", [True, False])
def test_an_exported_pack_is_adopted_without_a_copy_and_computes_the_same(bias, transpose, request):
    if not transpose:  # (with the decode kernel every group is stored transposed)
        request.getfixturevalue("without_kernel")
    lins = layers(bias) if transpose else layers(bias)[:1]
    packed = Linears(*lins, transpose=transpose)
    packed.pack()
    stored = packed.export()
    assert set(stored) == set(packed.stored_shapes())
    assert all(t.is_contiguous() and tuple(t.shape) == packed.stored_shapes()[k]
               for k, t in stored.items())  # fmt: skip
    built = Linears(*lins, transpose=transpose).packed_form(
        [lin.weight for lin in lins], [lin.bias for lin in lins]
    )
    assert all(torch.equal(built[k], stored[k]) for k in stored)
    copies = {k: v.clone() for k, v in stored.items()}
    fresh = Linears(*layers(bias)[: len(lins)], transpose=transpose)
    fresh.adopt(copies)
    assert fresh.packed and fresh.intact()
    ptrs = {p.data_ptr() for lin in fresh.linears for p in lin.parameters()}
    assert copies["weight_t" if transpose else "weight"].data_ptr() in ptrs
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), packed(x))


def test_adopt_refuses_tensors_that_do_not_fit():
    group = Linears(*layers(True))
    stored = Linears(*layers(True)).packed_form(
        [lin.weight for lin in group.linears], [lin.bias for lin in group.linears]
    )
    with pytest.raises(WeightsError, match="bias"):
        group.adopt({"weight_t": stored["weight_t"]})
    with pytest.raises(WeightsError, match="contiguous"):
        group.adopt({**stored, "weight_t": stored["weight_t"].t().contiguous().t()})
    assert not group.packed


def test_named_groups_name_the_attribute_paths():
    module = nn.Module()
    module.inner = nn.Module()
    module.inner.q, module.inner.k = layers(False)[:2]
    module.inner.both = Linears(module.inner.q, module.inner.k)
    module.top = Linears(layers(False)[2])
    assert [name for name, _ in named_groups(module)] == ["top", "inner.both"]
