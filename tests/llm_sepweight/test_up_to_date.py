"""A conversion whose output is complete and whose source and options are unchanged is not
redone ("up to date"); ``force`` / ``--force`` redoes it."""

import os
import shutil

import pytest
import torch

from llm_sepweight import convert, dump, verify
from llm_sepweight.stfile import map_file


def stamps(directory):
    """(inode, mtime) of every weight file: a rewritten file (temp file + rename) changes both."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("*.safetensors")
    }


@pytest.fixture()
def done(sw, checkpoints, tmp_path):
    """The tiny checkpoint (copied, so its files can be touched) converted once."""
    src = tmp_path / "src"
    shutil.copytree(checkpoints["single"], src)
    out = tmp_path / "out"
    first = convert(src, out, decider=sw.llama_decider())
    return src, out, first


def test_the_same_conversion_again_writes_nothing(sw, done):
    src, out, first = done
    before = stamps(out)
    again = convert(src, out, decider=sw.llama_decider())
    assert again == first and stamps(out) == before
    verify(out)


def test_force_converts_again(sw, done, tiny_llama):
    src, out, first = done
    before = stamps(out)
    again = convert(src, out, decider=sw.llama_decider(), force=True)
    assert again == first
    after = stamps(out)
    assert all(after[name] != before[name] for name in before)
    sw.assert_directory_holds(out, tiny_llama[1])


def test_a_changed_source_is_converted_again(sw, done, tiny_llama):
    src, out, _ = done
    before = stamps(out)
    weights = src / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    convert(src, out, decider=sw.llama_decider())
    assert all(stamps(out)[name] != before[name] for name in before)
    sw.assert_directory_holds(out, tiny_llama[1])


def test_other_options_or_placements_are_converted_again(sw, done, tiny_llama):
    src, out, _ = done
    convert(src, out, decider=sw.llama_decider(), dtype="bf16")
    sw.assert_directory_holds(out, tiny_llama[1], dtype=torch.bfloat16)
    before = stamps(out)
    base = sw.llama_decider()

    def renamed(key):  # the same files, one key named differently
        return ("end", "final_norm.weight") if key == "model.norm.weight" else base(key)

    convert(src, out, decider=renamed, dtype="bf16")
    assert "final_norm.weight" in map_file(out / "end.safetensors")
    assert stamps(out)["end.safetensors"] != before["end.safetensors"]


def test_an_incomplete_output_is_completed_not_redone(sw, done, tiny_llama):
    """A weight file removed (or truncated) after the conversion: only that file is rewritten."""
    src, out, _ = done
    before = stamps(out)
    (out / "mid.00001.safetensors").unlink()
    with open(out / "mid.00002.safetensors", "r+b") as f:
        f.truncate(100)
    convert(src, out, decider=sw.llama_decider())
    after = stamps(out)
    rewritten = {name for name in before if after[name] != before[name]}
    assert rewritten == {"mid.00001.safetensors", "mid.00002.safetensors"}
    sw.assert_directory_holds(out, tiny_llama[1])
    verify(out)


def test_converting_into_the_source_directory_twice(sw, checkpoints, tmp_path):
    """sepweight's own files in the source directory are not taken for source shards."""
    src = tmp_path / "model"
    shutil.copytree(checkpoints["single"], src)
    convert(src, src, decider=sw.llama_decider())
    before = stamps(src)
    convert(src, src, decider=sw.llama_decider())
    assert stamps(src) == before


def test_a_state_dict_is_always_written(sw, tiny_llama, tmp_path):
    _, state = tiny_llama
    dump(state, tmp_path / "o", sw.llama_decider())
    before = stamps(tmp_path / "o")
    convert(state, tmp_path / "o", decider=sw.llama_decider())
    assert all(stamps(tmp_path / "o")[name] != before[name] for name in before)
    assert not (tmp_path / "o" / ".sepweight-progress.json").exists()


def test_the_command_line_says_up_to_date(sw, tiny_gguf, tmp_path):
    out = tmp_path / "o"
    assert sw.run_cli("convert", tiny_gguf, out).stdout.startswith(f"wrote {out}:")
    before = stamps(out)
    line = sw.run_cli("convert", tiny_gguf, out).stdout
    assert line.startswith(f"up to date: {out} (toyarch, 2 layers") and "--force" in line
    assert stamps(out) == before
    assert sw.run_cli("convert", tiny_gguf, out, "--force").stdout.startswith("wrote")
    assert all(stamps(out)[name] != before[name] for name in before)
    assert sw.run_cli("convert", tiny_gguf, out, "--dtype", "f16").stdout.startswith("wrote")
