"""Fixtures of the llm_llama_model tests.

``smollm2_gguf``, ``smollm2_sepweight`` (the GGUF converted once per run) and
``smollm2_transformers`` (the transformers model read from the same GGUF, once) come from
tests/conftest.py.
"""

from __future__ import annotations

import pytest


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
