"""Streamed parts on a CUDA device: pinned host ring, device slots, side stream (skipped here)."""

from __future__ import annotations

import pytest
import torch

from llm_partial_run.streaming import load_streamed
from llm_sepweight import find_architecture, read_manifest

pytestmark = pytest.mark.cuda


def resident(directory, **kwargs):
    arch = find_architecture(name=read_manifest(directory).arch)
    return arch.load_part(directory, "f", device="cuda", **kwargs)


def run(part, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    cache = part.new_cache(ids.shape[0], ids.shape[1] + 3)
    out = [part(ids, mask, cache)]
    for token in (7, 13, 21):
        out.append(part(torch.full((ids.shape[0], 1), token, device="cuda"), None, cache))
    return [o.cpu() for o in out]


def batch():
    ids = torch.tensor([[0, 0, 5, 17, 3], [9, 2, 30, 4, 1]], device="cuda")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device="cuda").bool()
    return ids, mask


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_falcon"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_cuda_streamed_equals_resident(request, name, k):
    directory = request.getfixturevalue(name).directory
    want = run(resident(directory, pack=False), *batch())
    for prefetch in (True, False):
        with load_streamed(directory, resident_layers=k, device="cuda", prefetch=prefetch) as p:
            got = run(p, *batch())
            assert p.stats.bytes["host_copy"] >= sum(p.layer_bytes())
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_cuda_streamed_smollm2_k2_and_memory_is_reused(smollm2_sepweight):
    want = run(resident(smollm2_sepweight, pack=False), *batch())
    with load_streamed(smollm2_sepweight, resident_layers=2, device="cuda") as part:
        got = run(part, *batch())
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        run(part, *batch())
        torch.cuda.synchronize()
        # the slots and pinned buffers are reused: a second run allocates no more device memory
        # than its cache and outputs, never another layer
        assert torch.cuda.memory_allocated() - allocated < max(part.layer_bytes())
        assert part.stats.gb_per_s("to_device") > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_cuda_streamed_with_dtype_conversion(tiny_llama):
    want = run(resident(tiny_llama.directory, pack=False, dtype=torch.bfloat16), *batch())
    with load_streamed(
        tiny_llama.directory, resident_layers=2, device="cuda", dtype=torch.bfloat16
    ) as part:
        got = run(part, *batch())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
