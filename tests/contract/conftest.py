"""The contract tests run on one torch thread (restored afterwards): on the shared 2-core
machine a second OpenMP thread is often descheduled and every small product waits for it.
The several-thread paths have tests of their own (tests/*/test_*threads.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
