import json
import os

import pytest
import torch

from llm_sepweight import (
    FormatError,
    IntegrityError,
    PartSpecError,
    convert,
    files,
    load,
    read_manifest,
    verify,
)

LAYERS = 6


@pytest.fixture()
def model_dir(tmp_path):
    """A six-layer toy checkpoint converted to sepweight, plus the state dict it came from."""
    torch.manual_seed(1)
    state = {"emb.weight": torch.randn(8, 4), "norm.weight": torch.randn(4)}
    for i in range(LAYERS):
        state[f"h.{i}.w"] = torch.randn(4, 4)
        state[f"h.{i}.b"] = torch.full((4,), float(i))

    def decide(key):
        if key.startswith("h."):
            return ("mid", int(key.split(".")[1]), key.split(".", 2)[2])
        return ("begin", key) if key.startswith("emb") else ("end", key)

    convert(state, tmp_path / "sw", decider=decide, arch="toy")
    return tmp_path / "sw", state


def test_load_full_and_parts(model_dir):
    directory, state = model_dir
    full = load(directory, "f")
    assert str(full.spec) == f"b 0-{LAYERS} e"
    assert torch.equal(full.begin["emb.weight"], state["emb.weight"])
    assert torch.equal(full.end["norm.weight"], state["norm.weight"])
    part = load(directory, "2-4")
    assert part.begin == {} and part.end == {} and sorted(part.layers) == [2, 3]
    assert torch.equal(part.layers[3]["w"], state["h.3.w"])


def test_layer_remapping_into_local_slots(model_dir):
    directory, state = model_dir
    part = load(directory, "3-6 e")
    sd = part.state_dict(layer_prefix="layers.", end_prefix="head.")
    assert sorted(sd) == [
        "head.norm.weight", "layers.0.b", "layers.0.w", "layers.1.b", "layers.1.w",
        "layers.2.b", "layers.2.w",
    ]  # fmt: skip
    assert torch.equal(sd["layers.0.w"], state["h.3.w"])
    shifted = part.state_dict(first_slot=10)
    assert torch.equal(shifted["layers.12.b"], state["h.5.b"])


def test_loaded_tensors_are_memory_maps_of_the_files(model_dir):
    directory, _ = model_dir
    part = load(directory, "2-3")
    tensor = part.layers[2]["w"]
    tensor.add_(1)  # a private map: the file must not change
    again = load(directory, "2-3", verify=True)
    assert not torch.equal(again.layers[2]["w"], tensor)


def test_a_part_never_opens_other_files(model_dir):
    directory, state = model_dir
    for name in ("begin.safetensors", "end.safetensors", "mid.00000.safetensors"):
        os.remove(directory / name)
    (directory / "mid.00005.safetensors").write_bytes(b"garbage")
    part = load(directory, "1-5", verify=True)
    assert torch.equal(part.layers[4]["w"], state["h.4.w"])


def test_dtype_and_device(model_dir):
    directory, state = model_dir
    part = load(directory, "b 0-1", dtype=torch.bfloat16, device="cpu")
    assert part.begin["emb.weight"].dtype == torch.bfloat16
    assert torch.equal(part.begin["emb.weight"], state["emb.weight"].bfloat16())


def test_files_lists_what_a_node_needs(model_dir):
    directory, _ = model_dir
    names = [p.name for p in files(directory, "b 0-2")]
    assert names == ["manifest.json", "begin.safetensors", "mid.00000.safetensors",
                     "mid.00001.safetensors"]  # fmt: skip
    names = [p.name for p in files(directory, "4-6 e")]
    assert names == ["manifest.json", "mid.00004.safetensors", "mid.00005.safetensors",
                     "end.safetensors"]  # fmt: skip
    assert all(p.parent == directory for p in files(directory, "f"))


def test_part_beyond_the_model_is_an_error(model_dir):
    directory, _ = model_dir
    with pytest.raises(PartSpecError, match="has 6 layers"):
        load(directory, "4-8")
    with pytest.raises(PartSpecError, match="'4-x'"):
        files(directory, "4-x")


def test_directory_without_manifest(model_dir):
    directory, _ = model_dir
    os.remove(directory / "manifest.json")
    with pytest.raises(FormatError, match="manifest.json is missing"):
        load(directory, "0-1")
    with pytest.raises(FormatError, match="manifest.json is missing"):
        verify(directory)


def test_not_a_directory(tmp_path):
    with pytest.raises(FormatError, match="not a directory"):
        load(tmp_path / "nope", "f")


def test_missing_layer_file_is_named(model_dir):
    directory, _ = model_dir
    os.remove(directory / "mid.00002.safetensors")
    with pytest.raises(FormatError, match=r"mid\.00002\.safetensors is missing"):
        load(directory, "0-4")
    with pytest.raises(FormatError, match=r"mid\.00002\.safetensors is missing"):
        verify(directory)


def test_wrong_hash_is_named(model_dir):
    directory, _ = model_dir
    path = directory / "mid.00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"mid\.00001\.safetensors: sha256"):
        verify(directory)
    with pytest.raises(IntegrityError, match=r"mid\.00001\.safetensors: sha256"):
        load(directory, "0-2", verify=True)
    load(directory, "2-4", verify=True)  # other parts still load


def test_truncated_file_is_named(model_dir):
    directory, _ = model_dir
    path = directory / "end.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(IntegrityError, match=r"end\.safetensors has \d+ bytes"):
        load(directory, "e")
    with pytest.raises(IntegrityError, match=r"end\.safetensors"):
        verify(directory)


def test_truncated_file_with_matching_manifest_is_still_caught(model_dir):
    """Even if someone rewrote the manifest, a header pointing past the end is an error."""
    from llm_sepweight.stfile import map_file

    directory, _ = model_dir
    path = directory / "end.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(FormatError, match="truncated"):
        map_file(path)


def test_garbled_manifest(model_dir):
    directory, _ = model_dir
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_manifest(directory)
    (directory / "manifest.json").write_text(json.dumps({"format": "sepweight", "version": 9}))
    with pytest.raises(FormatError, match="version 9"):
        read_manifest(directory)


def test_reconverting_a_smaller_model_removes_stale_layer_files(model_dir):
    directory, state = model_dir
    small = {k: v for k, v in state.items() if not k.startswith(("h.4.", "h.5."))}
    convert(small, directory, decider=lambda k: ("mid", int(k[2]), k[4:]) if k[0] == "h" else
            ("begin", k))  # fmt: skip
    assert read_manifest(directory).num_layers == 4
    assert not (directory / "mid.00004.safetensors").exists()
    assert not (directory / "end.safetensors").exists()
    verify(directory)


@pytest.mark.cuda
def test_load_to_cuda(model_dir):
    directory, state = model_dir
    part = load(directory, "b 0-2", device="cuda", dtype=torch.float16)
    tensor = part.layers[1]["w"]
    assert tensor.is_cuda and tensor.dtype == torch.float16
    assert torch.equal(tensor.cpu(), state["h.1.w"].half())


def test_works_without_numpy(tmp_path):
    """numpy is not a dependency: writing, loading and verifying work where it is missing."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import sys, warnings
        sys.modules["numpy"] = None  # any import of numpy now fails
        warnings.simplefilter("ignore")
        import torch
        from llm_sepweight import dump, load, verify
        state = {{"e": torch.randn(3, 2), "l.0": torch.arange(4), "l.1": torch.ones(2).bfloat16()}}
        decide = lambda k: ("begin", k) if k == "e" else ("mid", int(k[2]), "w")
        dump(state, {str(tmp_path)!r}, decide)
        verify({str(tmp_path)!r})
        part = load({str(tmp_path)!r}, "b 0-2")
        assert torch.equal(part.begin["e"], state["e"])
        assert torch.equal(part.layers[1]["w"], state["l.1"])
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
