"""Across packages: model slices, stored by llm_sepweight and chained, driven by llm_sampler.

Three parts of a tiny random model, each loaded from its own files, chained with their own
KV caches, must generate the same tokens and give the same scores as the Hugging Face model they
came from, for a left-padded batch — for Llama and for Falcon, through one model-agnostic driver.
"""

from __future__ import annotations

import pytest
import torch

import llm_sampler
from llm_sepweight import convert

PROMPTS = [[5, 9, 2, 7, 11], [3, 4], [8, 1, 6]]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_falcon():
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
        new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False,
    )  # fmt: skip
    return FalconForCausalLM(config)


def chained(parts, batch_size: int, max_len: int):
    """A cached forward function over parts that pass hidden states along."""
    caches = [part.new_cache(batch_size, max_len) for part in parts]

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = ids
        for part, cache in zip(parts, caches, strict=True):
            x = part(x, mask=mask, cache=cache)
        return x

    return forward


@pytest.fixture(params=["llama", "falcon"])
def model_and_parts(request, tmp_path):
    torch.manual_seed(0)
    if request.param == "llama":
        from llm_llama_model import load_part

        model = tiny_llama().eval()
    else:
        from llm_falcon_model import load_part

        model = tiny_falcon().eval()
    model.save_pretrained(tmp_path / "hf")
    manifest = convert(tmp_path / "hf", tmp_path / "sw")  # model package found by entry point
    assert manifest.arch == request.param
    parts = [load_part(tmp_path / "sw", spec) for spec in ("b 0-2", "2-4", "4-6 e")]
    return model, parts


def test_chained_parts_generate_what_the_hf_model_generates(model_and_parts):
    model, parts = model_and_parts
    ours = llm_sampler.generate(
        chained(parts, len(PROMPTS), 32), PROMPTS, max_new_tokens=12, cached=True
    )
    theirs = llm_sampler.generate(
        llm_sampler.HFCausalLM(model), PROMPTS, max_new_tokens=12, cached=True
    )
    assert ours == theirs
    alone = [
        llm_sampler.generate(chained(parts, 1, 32), [p], max_new_tokens=12, cached=True)[0]
        for p in PROMPTS
    ]
    assert ours == alone


def test_chained_parts_score_like_the_hf_model(model_and_parts):
    model, parts = model_and_parts
    full = [parts[0], parts[1], parts[2]]

    def uncached(ids, mask):
        x = ids
        for part in full:
            x = part(x, mask=mask)
        return x

    continuations = [[1, 2, 3], [4], [7, 7]]
    ours = llm_sampler.score_continuations(uncached, PROMPTS, continuations)
    theirs = llm_sampler.score_continuations(
        llm_sampler.HFCausalLM(model, cached=False), PROMPTS, continuations
    )
    torch.testing.assert_close(ours.total, theirs.total, atol=1e-4, rtol=0)
