"""Fixtures of the llm_llama_model tests.

``smollm2_gguf`` and ``smollm2_sepweight`` (the GGUF converted once per run) come from
tests/conftest.py; the transformers model read from the same GGUF is loaded once here.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf: Path):
    """(model, tokenizer) loaded by transformers from the same GGUF (dequantized, float32), once."""
    import transformers

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype="float32"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these tests on one intra-op thread, restored afterwards.

    On the shared 2-core machine a second OpenMP thread is often descheduled, and every small
    matmul then waits for it: one thread is ~10x faster there for these small models.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
