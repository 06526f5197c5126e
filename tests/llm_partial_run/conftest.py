"""Fixtures of the llm_partial_run tests.

- ``tiny_llama`` / ``tiny_falcon``: a tiny random transformers model and its sepweight directory
  (converted once per run by llm_sepweight, the model package found by entry point).
- ``smollm2_sepweight`` (tests/conftest.py): the real SmolLM2, converted once per run.
- ``node_process(directory, part, *args)``: a node in its own process
  (``python -m llm_partial_run serve``), started and waited on until it prints its ready line;
  stopped at the end of the test. ``shared_nodes(directory, specs)``: node processes started
  once per run and shared by every test that asks for the same ones (a node costs ~1-2 s of
  torch import on this machine).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

READY_TIMEOUT = 120.0


@dataclass
class NodeProcess:
    """A ``llm-partial-run serve`` child process and the address it printed."""

    proc: subprocess.Popen
    address: str = ""
    stderr_lines: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL if it does not exit within 10 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        if self.proc.returncode is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def start_node(directory: Path, part: str, *args: str, wait: bool = True) -> NodeProcess:
    """Start a node process; with ``wait``, return once it printed ``ready HOST:PORT``."""
    cmd = [sys.executable, "-m", "llm_partial_run", "serve", str(directory), "--part", part,
           "--threads", "1", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    node = NodeProcess(proc)
    if wait:
        node.address = wait_ready(node)
    return node


def wait_ready(node: NodeProcess) -> str:
    """Read the node's stdout until its ready line; raise with its stderr if it exits first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([node.proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = node.proc.stdout.readline()
        if line.startswith("ready "):
            return line.split()[1]
        if not line:  # exited
            node.proc.wait()
            error = node.proc.stderr.read()
            raise RuntimeError(f"node exited with {node.proc.returncode}: {error}")
    node.proc.kill()
    raise RuntimeError(f"node not ready within {READY_TIMEOUT} s")


def _tiny_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        initializer_range=0.2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _tiny_hf_falcon():
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
        new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False,
    )  # fmt: skip
    return FalconForCausalLM(config)


@dataclass(frozen=True)
class TinyModel:
    """A random transformers model and the sepweight directory converted from it."""

    hf: torch.nn.Module
    directory: Path
    specs: tuple[str, ...] = ("b 0-2", "2-4", "4-6 e")


def _converted(make, name: str, factory: pytest.TempPathFactory, std: float | None) -> TinyModel:
    from llm_sepweight import convert

    torch.manual_seed(0)
    model = make().eval()
    if std is not None:  # weights drawn so that greedy tokens vary (and a wrong cache shows)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(std=std)
    root = factory.mktemp(name)
    model.save_pretrained(root / "hf")
    convert(root / "hf", root / name)
    return TinyModel(model, root / name)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny random Llama (6 layers, tied head) and its sepweight directory."""
    return _converted(_tiny_hf_llama, "tiny-llama", tmp_path_factory, None)


@pytest.fixture(scope="session")
def tiny_falcon(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny random Falcon (6 layers, new decoder architecture) and its sepweight directory."""
    return _converted(_tiny_hf_falcon, "tiny-falcon", tmp_path_factory, 0.1)


@pytest.fixture
def node_process() -> Iterator[Callable[..., NodeProcess]]:
    """``node_process(directory, part, *args, wait=True)``: a node process stopped afterwards."""
    started: list[NodeProcess] = []

    def start(directory: Path, part: str, *args: str, wait: bool = True) -> NodeProcess:
        node = start_node(directory, part, *args, wait=wait)
        started.append(node)
        return node

    yield start
    _stop_all(started)


@pytest.fixture(scope="session")
def shared_nodes() -> Iterator[Callable[[Path, tuple[str, ...]], list[str]]]:
    """``shared_nodes(directory, specs)`` -> addresses of node processes serving those parts,
    started in parallel the first time they are asked for and kept for the whole run."""
    running: dict[tuple[Path, tuple[str, ...]], list[NodeProcess]] = {}

    def get(directory: Path, specs: tuple[str, ...]) -> list[str]:
        key = (Path(directory), tuple(specs))
        if key not in running:
            nodes = [start_node(directory, spec, wait=False) for spec in specs]
            for node in nodes:
                node.address = wait_ready(node)
            running[key] = nodes
        return [node.address for node in running[key]]

    yield get
    stopping = [node for nodes in running.values() for node in nodes]
    _stop_all(stopping)


def _stop_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:  # signal every node first: they shut down at the same time
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        node.stop()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread in this process (the shared 2-core machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
