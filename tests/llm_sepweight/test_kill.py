"""A conversion killed with SIGKILL half-way, then run again, finishes, resumes and verifies."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from llm_sepweight import FormatError, convert, load, read_manifest, verify

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import llm_sepweight.writer as writer
    from llm_sepweight import convert, prefix_decider

    real_write = writer.write_file
    calls = []

    def dying_write(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # die in the middle of the third file
            with open(writer.temp_path(path), "wb") as f:
                f.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, tensors, metadata)

    writer.write_file = dying_write
    base = prefix_decider(r"model\\.layers\\.(\\d+)\\.", begin=("model.",))
    def decide(k):  # the same placements as the tests' llama_decider: the re-run resumes
        if k in ("model.norm.weight", "lm_head.weight"):
            return ("end", k.removeprefix("model."))
        return base(k)

    convert(sys.argv[1], sys.argv[2], decider=decide)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_then_rerun_resumes_and_verifies(sw, checkpoints, tiny_llama, tmp_path):
    _, state = tiny_llama
    src, out = checkpoints["sharded"], tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()

    # The killed run left two finished files, a half temp file, and no manifest.
    assert not (out / "manifest.json").exists()
    assert any(p.name.startswith(".") and ".tmp-" in p.name for p in out.iterdir())
    with pytest.raises(FormatError, match="manifest.json is missing"):
        load(out, "f")
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")}
    assert len(done) == 2

    manifest = convert(src, out, decider=sw.llama_decider())
    assert manifest.num_layers == sw.NUM_LAYERS
    verify(out)
    sw.assert_directory_holds(out, state)
    for name, stamp in done.items():  # resumed: the finished files were not written again
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    # no temporary file is left; the journal stays, marked finished (see test_up_to_date.py)
    kept = [*read_manifest(out).files, "manifest.json", ".sepweight-progress.json"]
    assert sorted(os.listdir(out)) == sorted(kept)


def test_rerun_with_other_options_starts_over(sw, checkpoints, tiny_llama, tmp_path):
    """A journal from a different conversion (here another dtype) is never trusted."""
    import torch

    _, state = tiny_llama
    out = tmp_path / "out"
    convert(checkpoints["single"], out, decider=sw.llama_decider())
    convert(checkpoints["single"], out, decider=sw.llama_decider(), dtype="bf16")
    sw.assert_directory_holds(out, state, dtype=torch.bfloat16)
    verify(out)
