"""Fixtures for llm_sepweight: tiny checkpoints written the way Hugging Face writes them.

The tests use a decider of their own (for Llama key names) and never import a model package.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_sepweight import prefix_decider

NUM_LAYERS = 3


def llama_decider():
    """Hugging Face Llama names -> sepweight places, written here so no model package is needed."""
    base = prefix_decider(r"model\.layers\.(\d+)\.", begin=("model.",))

    def decide(key: str):
        if key in ("model.norm.weight", "lm_head.weight"):
            return ("end", key.removeprefix("model."))
        return base(key)

    return decide


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random transformers Llama model and its state dict (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_bin(state: dict, directory: Path, config: dict, shards: int = 1) -> None:
    """Write ``pytorch_model*.bin`` files (with an index when sharded) like older transformers."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    keys = list(state)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="session")
def checkpoints(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """The tiny model saved in every Hugging Face layout: single, sharded, .bin, sharded .bin."""
    model, state = tiny_llama
    root = tmp_path_factory.mktemp("checkpoints")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="8KB")
    config = model.config.to_dict()
    save_bin(state, root / "bin", config)
    save_bin(state, root / "bin-sharded", config, shards=3)
    (root / "single" / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    return {p.name: p for p in root.iterdir()}


def expected_layout(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """What a sepweight directory of ``state`` must hold, file by file, under ``llama_decider``."""
    from llm_sepweight.decider import file_of

    decide = llama_decider()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        placement = decide(key)
        out.setdefault(file_of(placement), {})[placement[-1]] = tensor
    return out


class CliResult:
    """What one run of the command line did: exit status, stdout and stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, ok: bool = True) -> CliResult:
    """Run the command line in this process (importing torch once), capturing its output."""
    import contextlib
    import io

    from llm_sepweight.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    proc = CliResult(code, out.getvalue(), err.getvalue())
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def cli_error(*args, code: int = 1) -> str:
    """Run a command line that must fail: exit ``code``, one line on stderr, no traceback."""
    proc = run_cli(*args, ok=False)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-sepweight"), proc.stderr
    return lines[0]


class Helpers:
    """Helper functions handed to tests through the ``sw`` fixture."""

    NUM_LAYERS = NUM_LAYERS
    llama_decider = staticmethod(llama_decider)
    expected_layout = staticmethod(expected_layout)
    save_bin = staticmethod(save_bin)
    run_cli = staticmethod(run_cli)
    cli_error = staticmethod(cli_error)

    @staticmethod
    def assert_directory_holds(directory, state, dtype=None):
        """Every file of the directory holds exactly the expected tensors, bit for bit."""
        from llm_sepweight.stfile import map_file

        for name, tensors in expected_layout(state).items():
            stored = map_file(directory / name)
            assert set(stored) == set(tensors), name
            for key, tensor in tensors.items():
                want = tensor.to(dtype) if dtype is not None else tensor
                assert stored[key].dtype == want.dtype
                assert torch.equal(stored[key], want), (name, key)


@pytest.fixture(scope="session")
def sw() -> type[Helpers]:
    """The helpers of this folder's tests."""
    return Helpers


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A small GGUF file of a made-up architecture: F32, F16 and Q8_0 tensors, 2 layers."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "toy.gguf"
    writer = gguf.GGUFWriter(path, "toyarch")
    writer.add_block_count(2)
    writer.add_uint32("toyarch.embedding_length", 32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor(
        "token_embd.weight",
        gguf.quants.quantize(rng.standard_normal((16, 32), dtype=np.float32), q8),
        raw_dtype=q8,
    )  # noqa: E501
    for i in range(2):
        writer.add_tensor(
            f"blk.{i}.attn_q.weight",
            gguf.quants.quantize(rng.standard_normal((32, 32), dtype=np.float32), q8),
            raw_dtype=q8,
        )  # noqa: E501
        writer.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(32, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rng.standard_normal((8, 32)).astype(np.float16))
    writer.add_tensor("output_norm.weight", rng.standard_normal(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
