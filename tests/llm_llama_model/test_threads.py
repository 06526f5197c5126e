"""Decoding on several CPU threads: each matrix product cut into blocks, one per thread.

The other tests of this package run on one thread (see conftest), where nothing is cut; these
set the thread count themselves.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llm_slice_core import SPLIT_MAX_ROWS, thread_splits
from llm_slice_core import product as _product

_spec = importlib.util.spec_from_file_location(
    "_parity", Path(__file__).with_name("test_parity.py")
)
_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parity)


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
def test_product_in_blocks_equals_the_matrix_product(k, m, layout, rows, splits):
    gen = torch.Generator().manual_seed(k * m + rows)
    if layout == "strided":
        w = torch.randn(k, 2 * m, generator=gen)[:, ::2]
    elif layout == "transposed":
        w = torch.randn(m, k, generator=gen).t()
    else:
        w = torch.randn(k, m, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    expected = x @ w
    got = _product(x, w, splits)
    assert got.shape == (rows, m)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(_product(x, w, 1), expected)


@pytest.mark.parametrize("threads", [3], indirect=True)
def test_only_small_float_cpu_products_are_cut(threads):
    cpu = torch.device("cpu")
    assert thread_splits(1, cpu, torch.float32) == 3
    assert thread_splits(SPLIT_MAX_ROWS, cpu, torch.float64) == 3
    assert thread_splits(SPLIT_MAX_ROWS + 1, cpu, torch.float32) == 1  # prefill
    assert thread_splits(1, cpu, torch.bfloat16) == 1
    assert thread_splits(1, torch.device("cuda"), torch.float32) == 1


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("case", ["gqa", "biases", "head_dim", "wide_head"])
def test_decode_on_several_threads_equals_transformers(case, threads, tmp_path):
    """Prefill and 20 cached decode steps of chained packed parts against transformers, with
    every small product cut into blocks ("wide_head": the head in column blocks)."""
    assert thread_splits(2, torch.device("cpu"), torch.float32) == threads
    model = _parity.hf_model(case)
    _parity.assert_prefill_and_decode_equal(model, _parity.split(model, tmp_path))


@pytest.mark.parametrize("threads", [3], indirect=True)
def test_unpacked_parts_on_several_threads_equal_transformers(threads, tmp_path):
    """``pack=False``: q/k/v stay separate linears, o and down are cut into blocks."""
    model = _parity.hf_model("biases")
    parts = _parity.split(model, tmp_path, pack=False)
    assert not any(layer.self_attn.qkv.packed for part in parts for layer in part.layers)
    _parity.assert_prefill_and_decode_equal(model, parts)


def test_the_compiled_graphs_operator_is_the_same_product():
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


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_compiled_part_on_several_threads_equals_eager(threads, tmp_path):
    """torch.compile of a whole part on 2 threads (the blocks as the custom op) against the
    eager part: prefill and decode steps (the forward runs under no_grad, as every part's)."""
    model = _parity.hf_model("wide_head")
    (part,) = _parity.split(model, tmp_path, specs=("f",))
    compiled = torch.compile(part, dynamic=True)
    ids = torch.randint(0, 1024, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        caches = [part.new_cache(2, 8), part.new_cache(2, 8)]
        for _ in range(3):
            expected, got = part(ids, cache=caches[0]), compiled(ids, cache=caches[1])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            ids = expected[:, -1:].argmax(-1)
