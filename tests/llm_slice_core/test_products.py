"""The block product of decode steps (llm_slice_core.products) and its custom op."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llm_slice_core import SPLIT_MAX_ROWS, product, thread_splits


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test on ``request.param`` torch threads, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


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
