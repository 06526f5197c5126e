"""Faults: a node killed or hung mid-generation.

Without a spare the client raises NodeError naming the node, within its timeout (never hangs);
with a spare for the lost part it replays the session's inputs there and the tokens are those of
an undisturbed run.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import llm_sampler
from llm_partial_run.errors import NodeError
from llm_partial_run.session import Pipeline

PROMPTS = [[5, 9, 2, 7, 11], [3, 4], [8, 1, 6]]
STEPS = 10


@pytest.fixture
def front(tiny_llama, shared_nodes):
    """Nodes holding 'b 0-2' and '2-4' that stay up (shared); the tests kill the end's nodes."""
    return shared_nodes(tiny_llama.directory, tiny_llama.specs)[:2]


def undisturbed(tiny_llama):
    return llm_sampler.generate(llm_sampler.HFCausalLM(tiny_llama.hf), PROMPTS,
                                max_new_tokens=STEPS, cached=True)  # fmt: skip


def run_until(session, kill_at: int, kill) -> list[list[int]]:
    """Generate STEPS tokens, calling ``kill()`` after ``kill_at`` of them."""
    stream = llm_sampler.generate_stream(session, PROMPTS, max_new_tokens=STEPS, cached=True)
    tokens = []
    for i, step in enumerate(stream):
        tokens.append(step.tolist())
        if i + 1 == kill_at:
            kill()
    return [list(row) for row in zip(*tokens, strict=True)]


def test_killed_node_raises_naming_it_within_the_timeout(tiny_llama, front, node_process):
    victim = node_process(tiny_llama.directory, "4-6 e")
    with Pipeline([*front, victim.address], timeout=5) as pipeline:
        session = pipeline.session(len(PROMPTS), 32)
        start = time.monotonic()
        with pytest.raises(NodeError, match=f"node {victim.address}: forward failed") as info:
            run_until(session, 3, lambda: os.kill(victim.proc.pid, signal.SIGKILL))
        assert time.monotonic() - start < 5 + 2
        assert info.value.node == victim.address
        session.close()  # the dead node's close is logged, not raised


def test_hung_node_raises_naming_it_within_the_timeout(tiny_llama, front, node_process):
    victim = node_process(tiny_llama.directory, "4-6 e")
    try:
        with Pipeline([*front, victim.address], timeout=1.5) as pipeline:
            session = pipeline.session(1, 32)
            session(torch.tensor([[5, 9, 2]]))
            os.kill(victim.proc.pid, signal.SIGSTOP)
            start = time.monotonic()
            with pytest.raises(NodeError, match=f"node {victim.address}: no answer to forward"):
                session(torch.tensor([[7]]))
            assert 1.5 <= time.monotonic() - start < 1.5 + 2
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("listed", ["twice", "spares="])
def test_a_spare_takes_over_with_the_same_tokens(tiny_llama, front, node_process, listed):
    """The lost part takes hidden states: the spare's cache is rebuilt from the recorded ones
    (a left-padded batch, so the masks are replayed too)."""
    first = node_process(tiny_llama.directory, "4-6 e")
    spare = node_process(tiny_llama.directory, "4-6 e")
    if listed == "twice":
        pipeline = Pipeline([*front, first.address, spare.address], timeout=5)
    else:
        pipeline = Pipeline([*front, first.address], spares=[spare.address], timeout=5)
    with pipeline, pipeline.session(len(PROMPTS), 32) as session:
        tokens = run_until(session, 4, lambda: os.kill(first.proc.pid, signal.SIGKILL))
        assert [link.name for link in session.links] == [*front, spare.address]
    assert tokens == undisturbed(tiny_llama)
