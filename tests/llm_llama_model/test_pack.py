"""Packed weights (``LlamaPart.pack``, the default of ``load_part``) against unpacked ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llm_llama_model import decider, load_part
from llm_sepweight import dump

# The tiny random configs of test_parity (imported by path: tests are not a package).
_spec = importlib.util.spec_from_file_location(
    "_parity", Path(__file__).with_name("test_parity.py")
)
_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parity)
CASES, SPECS, hf_model, run_chain = (
    _parity.CASES,
    _parity.SPECS,
    _parity.hf_model,
    _parity.run_chain,
)


def write(model, directory: Path) -> Path:
    """Store a transformers model as sepweight in ``directory``."""
    config = model.config.to_dict()
    dump(model.state_dict(), directory, decider(config), arch="llama", config=config)
    return directory


def steps(parts, ids, n: int = 4) -> torch.Tensor:
    """Logits of a prefill and ``n`` greedy cached steps through the chained parts."""
    caches = [p.new_cache(ids.shape[0], ids.shape[1] + n) for p in parts]
    out = [run_chain(parts, ids, caches=caches)]
    for _ in range(n):
        out.append(run_chain(parts, out[-1][:, -1:].argmax(-1), caches=caches))
    return torch.cat(out, 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_unpacked_parts_equal_transformers(case, tmp_path):
    model = hf_model(case)
    parts = [load_part(write(model, tmp_path), s, pack=False) for s in SPECS]
    assert not any(layer.self_attn.qkv.packed for p in parts for layer in p.layers)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(run_chain(parts, ids), model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["biases", "mqa_tied", "head_dim"])
def test_packed_equals_unpacked(case, tmp_path):
    directory = write(hf_model(case), tmp_path)
    packed = [load_part(directory, s) for s in ("b 0-2", "2-4 e")] + [load_part(directory, "f")]
    plain = [load_part(directory, s, pack=False) for s in ("b 0-2", "2-4 e")]
    assert all(layer.mlp.gate_up.intact() for p in packed for layer in p.layers)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = steps(plain, ids)
        torch.testing.assert_close(steps(packed[:2], ids), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(steps(packed[2:], ids), expected, atol=1e-5, rtol=0)


def test_pack_keeps_every_weight_under_its_name(tmp_path):
    part = load_part(write(hf_model("biases"), tmp_path), "f", pack=False)
    before = {k: v.clone() for k, v in part.state_dict().items()}
    part.pack()
    after = part.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    layer = part.layers[1]
    start = layer.self_attn.qkv.weight_t.data_ptr()
    assert layer.self_attn.k_proj.weight.data_ptr() > start  # a view into the packed matrix


def test_weights_loaded_after_packing_are_used(tmp_path):
    """load_state_dict copies into the packed views; assign=True replaces them (and the part
    falls back to separate products); a dtype change does too. All stay correct."""
    directory = write(hf_model("gqa", seed=0), tmp_path / "a")
    other = hf_model("gqa", seed=1)
    part = load_part(directory, "f")
    new = {k: v.clone() for k, v in other.state_dict().items() if k.startswith("model.")}
    new = {k.removeprefix("model."): v for k, v in new.items()} | {
        "lm_head.weight": other.lm_head.weight.detach().clone()
    }
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        expected = other(ids).logits
        part.load_state_dict(new)
        assert part.layers[0].self_attn.qkv.intact()
        torch.testing.assert_close(part(ids), expected, atol=1e-4, rtol=0)

        fresh = load_part(directory, "f")
        fresh.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
        assert not fresh.layers[0].self_attn.qkv.intact()
        torch.testing.assert_close(fresh(ids), expected, atol=1e-4, rtol=0)
        assert not fresh.layers[0].self_attn.qkv.packed and not fresh.layers[0].mlp.gate_up.packed
        assert not fresh.head.packed  # dropped by the forward call

        doubled = load_part(directory, "f").double()
        assert not doubled.layers[0].self_attn.qkv.intact()
        reference = load_part(directory, "f", pack=False).double()
        torch.testing.assert_close(doubled(ids), reference(ids), atol=1e-9, rtol=0)
        doubled.pack()  # packing again after the change packs the float64 weights
        assert doubled.layers[0].self_attn.qkv.weight_t.dtype == torch.float64
        torch.testing.assert_close(doubled(ids), reference(ids), atol=1e-9, rtol=0)


def _mapped(directory: Path) -> set[str]:
    """Names of the files of ``directory`` this process has memory-mapped now."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux) to see which files are mapped")
    prefix = str(directory.resolve())
    lines = maps.read_text().splitlines()
    return {Path(line.split()[-1]).name for line in lines if line.split()[-1].startswith(prefix)}


@pytest.mark.parametrize("tied", [False, True])
def test_packing_releases_the_mapped_files(tied, tmp_path):
    case = "mqa_tied" if tied else "gqa"
    directory = write(hf_model(case), tmp_path)
    plain = load_part(directory, "b 0-2 e", pack=False)
    assert {"mid.00000.safetensors", "end.safetensors"} <= _mapped(directory)
    del plain
    packed = load_part(directory, "b 0-2 e")
    mapped = _mapped(directory)
    assert not {"mid.00000.safetensors", "mid.00001.safetensors"} & mapped
    # The untied embedding stays mapped (a lookup reads only its rows); a tied one is the head.
    assert ("begin.safetensors" in mapped) is (not tied)
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        reference = load_part(directory, "b 0-2 e", pack=False)
        torch.testing.assert_close(packed(ids), reference(ids), atol=1e-5, rtol=0)
