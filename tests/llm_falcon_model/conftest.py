"""Tiny random Falcons of every variant transformers runs, and their sepweight parts.

Each variant is a transformers ``FalconForCausalLM`` built from a config object (no download),
with weights drawn large enough (std 0.3) that a wrong layout or norm changes the logits a lot.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from llm_falcon_model import FalconPart, decider, load_part
from llm_sepweight import dump

VOCAB = 97
BASE = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
    ffn_hidden_size=48,
)  # fmt: skip
VARIANTS = {
    # Falcon-7B: multi-query, parallel attention + MLP behind one norm.
    "falcon-7b": dict(multi_query=True, parallel_attn=True),
    # Falcon-40B/180B: new decoder architecture, grouped KV heads, ln_attn + ln_mlp.
    "falcon-40b": dict(new_decoder_architecture=True, num_kv_heads=2),
    # Falcon2-11B: new decoder architecture with one norm.
    "falcon2-11b": dict(
        new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1,
        rope_theta=500042.0,
    ),
    # Sequential blocks, plain multi-head attention, biases, rotary, untied head.
    "sequential-mha-bias": dict(
        multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False
    ),
    # Falcon-RW: ALiBi, sequential, multi-head, biases; 6 heads exercise the non-power-of-2 slopes.
    "falcon-rw-alibi": dict(
        alibi=True, multi_query=False, parallel_attn=False, bias=True, hidden_size=48,
        num_attention_heads=6,
    ),
    # Linear RoPE scaling and the tanh GELU.
    "rope-linear": dict(
        multi_query=True, rope_scaling={"rope_type": "linear", "factor": 2.0},
        activation="gelu_pytorch_tanh",
    ),
}  # fmt: skip
SPLIT = ("b 0-1", "1-2", "2-3 e")


def hf_falcon(variant: str, seed: int = 0) -> transformers.FalconForCausalLM:
    """A random transformers Falcon of ``variant`` (eval mode, SDPA attention, float32)."""
    torch.manual_seed(seed)
    config = transformers.FalconConfig(**{**BASE, **VARIANTS[variant]})
    model = transformers.FalconForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
    return model


def dump_parts(
    model: transformers.FalconForCausalLM, directory: Path, specs=SPLIT, dtype=None
) -> list[FalconPart]:
    """Write ``model`` as a sepweight directory with the package's decider; load ``specs``."""
    hf_config = model.config.to_dict()
    dump(model.state_dict(), directory, decider(hf_config), arch="falcon", config=hf_config)
    return [load_part(directory, spec, dtype=dtype) for spec in specs]


def run_chain(parts, x, mask=None, caches=None) -> torch.Tensor:
    """Feed ``x`` through the parts in order (with their caches, when given)."""
    caches = caches or [None] * len(parts)
    for part, cache in zip(parts, caches, strict=True):
        x = part(x, mask=mask, cache=cache)
    return x


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (which cannot import a conftest by name)."""
    return SimpleNamespace(
        VOCAB=VOCAB, VARIANTS=VARIANTS, SPLIT=SPLIT, hf_falcon=hf_falcon, dump_parts=dump_parts,
        run_chain=run_chain,
    )  # fmt: skip
