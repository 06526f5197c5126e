"""The products of decode steps (llm_slice_core.products): oneDNN for several rows, blocks for
one, torch's own where oneDNN is missing; the blocks' custom op."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llm_slice_core import SPLIT_MAX_ROWS, Linears, product, products, thread_splits


@pytest.mark.parametrize("splits", [2, 3, 4, 7])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize(
    ("k", "m", "layout"),
    [
        (48, 40, "contiguous"),  # narrow: row blocks
        (48, 40, "transposed"),  # the transposed view o_proj and down_proj are used through
        (48, 40, "strided"),  # neither (e.g. a weight a user assigned): still a view
        (50, 36, "contiguous"),  # 50 rows: 7 and 4 threads fall back to 5 and 2 blocks
        (8, 96, "contiguous"),  # wide (at least 8 times as many columns as rows): column blocks
        (8, 100, "contiguous"),  # 100 columns: 3 and 7 threads fall back to 2 and 5 blocks
    ],
)
def test_product_in_blocks_equals_the_matrixproduct(k, m, layout, rows, splits):
    gen = torch.Generator().manual_seed(k * m + rows)
    if layout == "strided":
        w = torch.randn(k, 2 * m, generator=gen)[:, ::2]
    elif layout == "transposed":
        w = torch.randn(m, k, generator=gen).t()
    else:
        w = torch.randn(k, m, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    expected = x @ w
    got = product(x, w, splits)
    assert got.shape == (rows, m)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(product(x, w, 1), expected)


@pytest.mark.parametrize("threads", [3], indirect=True)
def test_only_small_float_cpu_products_are_cut(threads):
    cpu = torch.device("cpu")
    assert thread_splits(1, cpu, torch.float32) == 3
    assert thread_splits(SPLIT_MAX_ROWS, cpu, torch.float64) == 3
    assert thread_splits(SPLIT_MAX_ROWS + 1, cpu, torch.float32) == 1  # prefill
    assert thread_splits(1, cpu, torch.bfloat16) == 1
    assert thread_splits(1, torch.device("cuda"), torch.float32) == 1


def test_the_compiled_graphs_operator_is_the_sameproduct():
    """Under torch.compile the blocks run as the custom op llm_slice_core::product_in_blocks
    (inductor would otherwise lower the batched product into a slower loop of its own); it has
    a gradient, so a compiled part also trains."""
    gen = torch.Generator().manual_seed(5)
    for w in (torch.randn(48, 40, generator=gen), torch.randn(40, 48, generator=gen).t()):
        x = torch.randn(2, 48, generator=gen)
        got = torch.ops.llm_slice_core.product_in_blocks(x, w, 3)
        torch.testing.assert_close(got, x @ w, atol=1e-5, rtol=1e-5)
        torch.library.opcheck(torch.ops.llm_slice_core.product_in_blocks, (x, w, 3))
    x = torch.randn(3, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(16, 10, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.llm_slice_core.product_in_blocks, (x, w, 4))
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.llm_slice_core.product_in_blocks(a, b, 4), (x, w)
    )


def group_of(transpose: bool, bias: bool) -> Linears:
    """Two layers 24 -> 40 and 24 -> 8 side by side, or one 24 -> 40 output projection."""
    gen = torch.Generator().manual_seed(7)
    outs = (40, 8) if transpose else (40,)
    lins = [nn.Linear(24, n, bias=bias).requires_grad_(False) for n in outs]
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
            if bias:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
    return Linears(*lins, transpose=transpose)


@pytest.mark.skipif(not products._ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("kernel", [True, False])
def test_products_of_1_to_16_rows_equal_the_matrix_product(
    threads, packed, transpose, bias, residual, kernel, monkeypatch, request
):
    """Packed with the decode kernel, every row count on it; else rows 2.. on oneDNN (the bias
    fused), 1 row on torch; every layout, all equal x @ w."""
    if not kernel:
        request.getfixturevalue("without_kernel")
    monkeypatch.setattr(products, "ONEDNN_MIN_WEIGHT", 0)  # these weights are small
    group = group_of(transpose, bias)
    if packed:
        group.pack()
    w = torch.cat([lin.weight for lin in group.linears]).t()  # [24, M]
    b = torch.cat([lin.bias for lin in group.linears]) if bias else torch.zeros(w.shape[1])
    gen = torch.Generator().manual_seed(3)
    for rows in range(1, SPLIT_MAX_ROWS + 1):
        x = torch.randn(rows, 24, generator=gen)
        h = torch.randn(rows, w.shape[1], generator=gen) if residual else None
        expected = x.double() @ w.double() + b.double() + (0 if h is None else h.double())
        if not packed:
            assert products.onednn_suits(x, group.linears[0].weight.t()) == (rows > 1)
        got = group(x, products.thread_splits(rows, x.device, x.dtype), residual=h)
        torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)


def test_the_onednn_path_and_the_fallback_agree(monkeypatch, without_kernel):
    """Both paths give the same products (fp32 rounding apart); where the op is missing every
    product takes torch's own path."""
    calls = []
    monkeypatch.setattr(products, "ONEDNN_MIN_WEIGHT", 0)
    if products._ONEDNN_LINEAR is not None:
        real = products._ONEDNN_LINEAR
        monkeypatch.setattr(
            products, "_ONEDNN_LINEAR", lambda *args: calls.append(1) or real(*args)
        )
    group = group_of(True, True)
    group.pack()
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(1))
    fast = group(x, 2)
    taken = len(calls)
    assert taken == (0 if products._ONEDNN_LINEAR is None else 1)
    monkeypatch.setattr(products, "_ONEDNN_LINEAR", None)
    assert not products.onednn_suits(x, group.weight_t)
    torch.testing.assert_close(group(x, 2), fast, atol=1e-5, rtol=1e-5)
    assert len(calls) == taken  # the fallback did not touch oneDNN


def test_a_torch_without_onednn_linear_is_found_out(monkeypatch):
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())  # a build without the op
    assert products._find_onednn_linear() is None
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert products._find_onednn_linear() is None


def test_small_or_gradient_wanting_or_other_dtype_products_keep_torchs_path():
    x, w = torch.randn(4, 512), torch.randn(512, 576)  # the smallest weight oneDNN takes
    assert products.onednn_suits(x, w) == (products._ONEDNN_LINEAR is not None)
    assert products.onednn_suits(x, w.t().contiguous().t()) == products.onednn_suits(x, w)
    assert not products.onednn_suits(x[:1], w)  # one row: torch.mm reads the pack faster
    assert not products.onednn_suits(x[:, :256], w[:256, :1024])  # oneDNN's setup costs more
    assert not products.onednn_suits(x.bfloat16(), w.bfloat16())
    assert not products.onednn_suits(x.double(), w.double())
    assert not products.onednn_suits(x, torch.randn(512, 1200)[:, ::2])  # neither layout
    assert not products.onednn_suits(x, w.requires_grad_())
    with torch.no_grad():
        assert products.onednn_suits(x, w) == (products._ONEDNN_LINEAR is not None)


@pytest.mark.skipif(not products._ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
def test_a_product_of_model_size_on_onednn_equals_the_matrix_product(without_kernel):
    """SmolLM2's gate and up side by side (576 -> 2 x 1536), 8 rows, packed: no threshold moved."""
    gen = torch.Generator().manual_seed(11)
    lins = [nn.Linear(576, 1536, bias=False).requires_grad_(False) for _ in range(2)]
    for lin in lins:
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / 24)
    group = Linears(*lins)
    group.pack()
    x = torch.randn(8, 576, generator=gen)
    assert products.onednn_suits(x, group.weight_t)
    expected = x.double() @ group.weight_t.double()
    torch.testing.assert_close(group(x), expected.float(), atol=1e-5, rtol=1e-5)
