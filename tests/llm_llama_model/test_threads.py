"""Decoding on several CPU threads: each matrix product cut into blocks, one per thread.

The other tests of this package run on one thread (see conftest), where nothing is cut; these
set the thread count themselves. The block product itself is tested in tests/llm_slice_core.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llm_slice_core import attention as grouped_attention
from llm_slice_core import products, thread_splits

_spec = importlib.util.spec_from_file_location(
    "_parity", Path(__file__).with_name("test_parity.py")
)
_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parity)


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


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("paths", ["kernel", "packed onednn", "unpacked onednn"])
@pytest.mark.parametrize("case", ["gqa", "biases", "wide_head"])
def test_decode_on_the_fast_paths_equals_transformers(
    case, paths, threads, tmp_path, monkeypatch, request
):
    """Packed, every product on the decode kernel; or (the kernel off, as without a compiler,
    and unpacked) every product of 2 rows or more (this batch of 2) on oneDNN, however small
    its weight; and every decode step's attention as one product per key/value head."""
    pack = paths != "unpacked onednn"
    if paths != "kernel":
        request.getfixturevalue("without_kernel")
    monkeypatch.setattr(products, "ONEDNN_MIN_WEIGHT", 0)
    monkeypatch.setattr(grouped_attention, "GROUPED_MIN_HEADS", 1)
    model = _parity.hf_model(case)
    _parity.assert_prefill_and_decode_equal(model, _parity.split(model, tmp_path, pack=pack))
