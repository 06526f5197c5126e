"""``verify(directory, part=...)`` and ``llm-sepweight verify DIR --part SPEC``: a node that holds
only its part's files (copied as ``llm-sepweight files --part`` lists them) checks them."""

import shutil

import pytest

from llm_sepweight import FormatError, IntegrityError, PartSpecError, convert, files, verify


@pytest.fixture(scope="module")
def full(sw, checkpoints, tmp_path_factory):
    """The tiny three-layer checkpoint converted (with a tokenizer file copied along)."""
    out = tmp_path_factory.mktemp("full") / "sw"
    convert(checkpoints["single"], out, decider=sw.llama_decider())
    return out


def node_copy(directory, spec, destination):
    """What `rsync -R $(llm-sepweight files DIR --part SPEC) node:` leaves on the node."""
    destination.mkdir()
    for path in files(directory, spec):
        shutil.copy2(path, destination / path.name)
    return destination


def flip_a_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_node_verifies_the_files_it_holds(full, tmp_path):
    node = node_copy(full, "1-2", tmp_path / "node")
    assert sorted(p.name for p in node.iterdir()) == [
        "generation_config.json", "manifest.json", "mid.00001.safetensors", "tokenizer.json",
    ]  # fmt: skip
    manifest = verify(node, part="1-2")
    assert manifest.num_layers == 3
    with pytest.raises(FormatError, match="begin.safetensors is missing"):
        verify(node)  # the whole model is not there


def test_a_flipped_byte_in_the_part_is_caught(full, tmp_path):
    node = node_copy(full, "2-3 e", tmp_path / "node")
    verify(node, part="2-3 e")
    flip_a_byte(node / "end.safetensors")
    with pytest.raises(IntegrityError, match=r"end\.safetensors: sha256 does not match"):
        verify(node, part="2-3 e")
    verify(node, part="2-3")  # a part without the end does not read it


def test_the_manifest_is_checked_too(full, tmp_path):
    node = node_copy(full, "b 0-1", tmp_path / "node")
    (node / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(FormatError, match="not a sepweight manifest"):
        verify(node, part="b 0-1")


def test_a_bad_spec_is_a_part_spec_error(full):
    with pytest.raises(PartSpecError):
        verify(full, part="0-9")
    with pytest.raises(PartSpecError):
        verify(full, part="1-2x")


def test_the_command_line(sw, full, tmp_path):
    node = node_copy(full, "1-2", tmp_path / "node")
    out = sw.run_cli("verify", node, "--part", "1-2").stdout
    assert out == "ok: part '1-2': its 3 files match the manifest\n"
    assert "begin.safetensors is missing" in sw.cli_error("verify", node)
    flip_a_byte(node / "mid.00001.safetensors", offset=200)
    line = sw.cli_error("verify", node, "--part", "1-2")
    assert "mid.00001.safetensors: sha256 does not match" in line
