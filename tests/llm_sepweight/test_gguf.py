"""GGUF sources: every tensor equals the gguf package's own dequantization of it."""

import gguf
import numpy as np
import pytest
import torch

from llm_sepweight import convert, gguf_decider, load, verify


def dequantized(path):
    """name -> float32 tensor in torch order, straight from the gguf package."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = torch.from_numpy(array.reshape(tuple(reversed(t.shape.tolist()))).copy())
    return out


def assert_equal_to_gguf(directory, path, num_layers):
    want = dequantized(path)
    weights = load(directory, "f")
    got = {k: v for k, v in weights.begin.items()}
    got.update({k: v for k, v in weights.end.items()})
    for i in range(num_layers):
        got.update({f"blk.{i}.{k}": v for k, v in weights.layers[i].items()})
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], tensor), name


def test_tiny_gguf_of_unknown_architecture_keeps_gguf_names(tiny_gguf, tmp_path):
    manifest = convert(tiny_gguf, tmp_path / "o")
    assert manifest.arch == "toyarch" and manifest.num_layers == 2
    assert manifest.config["toyarch.embedding_length"] == 32
    assert_equal_to_gguf(tmp_path / "o", tiny_gguf, 2)
    verify(tmp_path / "o")


def test_gguf_dtype_conversion(tiny_gguf, tmp_path):
    convert(tiny_gguf, tmp_path / "o", dtype="bf16")
    weights = load(tmp_path / "o", "b")
    want = dequantized(tiny_gguf)["token_embd.weight"].bfloat16()
    assert torch.equal(weights.begin["token_embd.weight"], want)


def test_not_a_gguf_file(tmp_path):
    from llm_sepweight import FormatError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(FormatError, match="bad.gguf"):
        convert(bad, tmp_path / "o")


@pytest.mark.slow
def test_smollm2_gguf_converts_exactly(smollm2_gguf, tmp_path):
    """The real SmolLM2 (Q4_1/Q8_0): every converted tensor equals gguf's dequantization."""
    manifest = convert(smollm2_gguf, tmp_path / "o", decider=gguf_decider())
    assert manifest.num_layers == 30 and manifest.arch == "llama"
    assert "tokenizer.json" in manifest.files and "tokenizer_config.json" in manifest.files
    assert_equal_to_gguf(tmp_path / "o", smollm2_gguf, 30)
    verify(tmp_path / "o")


def test_model_package_gets_tensor_names_for_its_config(tiny_gguf, tmp_path, monkeypatch):
    """``config_from_gguf`` sees the file's tensor names (e.g. to tell a tied head)."""
    site = tmp_path / "site"
    info = site / "toy_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[llm_microlibs.models]\ntoy = toy_plugin:ARCH\n")
    (site / "toy_plugin.py").write_text(
        "from llm_sepweight import Architecture, gguf_decider\n"
        "def config(meta):\n"
        "    return {'names': sorted(meta['sepweight.tensor_names']),\n"
        "            'vocab': meta.get('sepweight.vocab_size'), 'num_hidden_layers': 2}\n"
        "ARCH = Architecture(name='toy', model_types=(), decider=lambda c: gguf_decider(),\n"
        "                    gguf_architectures=('toyarch',), config_from_gguf=config,\n"
        "                    gguf_rename=lambda name: name)\n"
    )
    monkeypatch.syspath_prepend(str(site))
    manifest = convert(tiny_gguf, tmp_path / "o")
    assert manifest.arch == "toy"
    assert "output_norm.weight" in manifest.config["names"] and len(manifest.config["names"]) == 8
    assert manifest.config["vocab"] is None  # the toy file has no vocabulary
    assert_equal_to_gguf(tmp_path / "o", tiny_gguf, 2)
