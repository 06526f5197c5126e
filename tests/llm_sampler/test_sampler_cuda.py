"""Device placement on CUDA: ids, sampled tokens and the seeded generator follow the logits."""

from __future__ import annotations

import pytest
import torch

import llm_sampler as S

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none present"),
]


def test_seeded_sampling_on_cuda_logits_is_reproducible():
    logits = torch.randn(16, 50, device="cuda", dtype=torch.float16)
    tokens = torch.zeros(16, 1, dtype=torch.long, device="cuda")
    config = S.SamplingConfig(temperature=0.9, top_p=0.9)
    first = S.make_sampler(config, seed=3)(tokens, logits)
    assert first.device.type == "cuda"
    assert torch.equal(first, S.make_sampler(config, seed=3)(tokens, logits))


def test_generation_with_a_cuda_forward_function():
    table = torch.randn(10, 10, device="cuda")

    def forward(ids, mask):
        assert ids.device.type == "cuda" and mask.device.type == "cuda"
        return table[ids]

    prompts = torch.tensor([[1, 2, 3]], device="cuda")
    greedy = S.generate(forward, prompts, max_new_tokens=4, cached=True)
    on_cpu = table.cpu()
    expected, last = [], 3
    for _ in range(4):
        last = int(on_cpu[last].argmax())
        expected.append(last)
    assert greedy == [expected]
    sampled = S.generate(forward, prompts, max_new_tokens=4, seed=0,
                         sampling=S.SamplingConfig(temperature=1.0))  # fmt: skip
    assert sampled == S.generate(forward, prompts, max_new_tokens=4, seed=0,
                                 sampling=S.SamplingConfig(temperature=1.0))  # fmt: skip
