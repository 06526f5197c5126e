"""Fixtures for llm_sampler tests: a tiny random Llama built from a config (no download)."""

from __future__ import annotations

import pytest
import torch
import transformers


@pytest.fixture(scope="module")
def tiny_llama():
    """A 2-layer random LlamaForCausalLM (vocab 97), eval mode, greedy-ready generation config."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # sharper logits than the default, so greedy choices are clear
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model
