"""The ``llm-sepweight`` command line: its commands, and every error a user can cause as one
line on stderr with a non-zero exit, never a traceback."""

import shutil
import subprocess
import sys

import pytest

from llm_sepweight import read_manifest
from llm_sepweight.cli import main


def test_python_dash_m_runs_the_command_line(tiny_gguf, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llm_sepweight", "convert", str(tiny_gguf), str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "o" / "manifest.json").is_file()


@pytest.fixture(scope="module")
def converted(sw, tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "sw"
    proc = sw.run_cli("convert", tiny_gguf, out, "--dtype", "fp16")
    assert "2 layers" in proc.stdout and "float16" in proc.stdout
    return out


def test_help_lists_every_command(sw):
    out = sw.run_cli("--help").stdout
    for word in ("convert", "info", "verify", "files", "part specs", "examples", "--part"):
        assert word in out
    for command in ("convert", "info", "verify", "files"):
        assert f"usage: llm-sepweight {command}" in sw.run_cli(command, "--help").stdout
    assert "--force" in sw.run_cli("convert", "--help").stdout
    assert "--part" in sw.run_cli("verify", "--help").stdout


def test_convert_info_verify(sw, converted):
    assert read_manifest(converted).dtype == "float16"
    info = sw.run_cli("info", converted).stdout
    assert "toyarch" in info and "layers      2" in info
    assert "ok: 4 files match the manifest" in sw.run_cli("verify", converted).stdout


def test_files_prints_one_path_per_line(sw, converted):
    lines = sw.run_cli("files", converted, "--part", "1-2 e").stdout.splitlines()
    assert [line.rsplit("/", 1)[1] for line in lines] == [
        "manifest.json", "mid.00001.safetensors", "end.safetensors"
    ]  # fmt: skip


def test_errors_on_a_sepweight_directory(sw, converted, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    assert "'0-2x'" in sw.cli_error("files", damaged, "--part", "b 0-2x")
    assert "needs layers up to 8" in sw.cli_error("verify", damaged, "--part", "0-9")
    assert "manifest.json is missing" in sw.cli_error("info", tmp_path)
    assert "is not a directory" in sw.cli_error("info", damaged / "manifest.json")
    (damaged / "mid.00000.safetensors").write_bytes(b"broken")
    assert "mid.00000.safetensors" in sw.cli_error("verify", damaged)


def test_usage_errors_are_one_line_with_exit_2(sw):
    line = sw.cli_error("files", "somewhere", code=2)
    assert "--part" in line and "llm-sepweight files --help" in line
    assert "invalid choice" in sw.cli_error("convrt", "a", "b", code=2)
    assert "dir" in sw.cli_error("verify", code=2)


# --- convert: what a user can get wrong --------------------------------------------------------


@pytest.fixture(scope="module")
def falcon_checkpoint(tmp_path_factory):
    """A tiny random Hugging Face Falcon directory (transformers' own save_pretrained)."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2)  # fmt: skip
    out = tmp_path_factory.mktemp("falcon") / "falcon"
    FalconForCausalLM(config).save_pretrained(out)
    return out


def test_arch_mismatch_raised_inside_a_model_package(sw, checkpoints, falcon_checkpoint, tmp_path):
    """The model packages' own errors (LlamaModelError, FalconModelError) arrive as one line."""
    line = sw.cli_error("convert", checkpoints["single"], tmp_path / "o", "--arch", "falcon")
    assert "the 'falcon' model package cannot convert" in line
    assert "--arch falcon was given" in line and "arch=" not in line
    line = sw.cli_error("convert", falcon_checkpoint, tmp_path / "o", "--arch", "llama")
    assert "the 'llama' model package cannot convert" in line and "'falcon'" in line
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_arch_mismatch_on_a_gguf_file(sw, tiny_gguf, tmp_path):
    """The Llama package's config_from_gguf refuses a GGUF of another architecture."""
    line = sw.cli_error("convert", tiny_gguf, tmp_path / "o", "--arch", "llama")
    assert "the 'llama' model package cannot convert" in line and "--arch llama" in line


def test_the_python_api_raises_a_conversion_error_naming_the_package(checkpoints, tmp_path):
    from llm_sepweight import ConversionError, convert

    with pytest.raises(ConversionError, match="'falcon' model package .*arch='falcon'") as info:
        convert(checkpoints["single"], tmp_path / "o", arch="falcon")
    assert isinstance(info.value.__cause__, ValueError)  # the package's own error, kept as cause


def test_out_an_existing_file(sw, checkpoints, tmp_path):
    (tmp_path / "afile").write_text("")
    line = sw.cli_error("convert", checkpoints["single"], tmp_path / "afile")
    assert "exists and is not a directory" in line
    # below a file: the operating system's error, reported as one line with the path
    line = sw.cli_error("convert", checkpoints["single"], tmp_path / "afile" / "sub")
    assert "afile" in line and "Not a directory" in line


def test_a_sepweight_source_is_recognised(sw, converted, tmp_path):
    line = sw.cli_error("convert", converted, tmp_path / "o")
    assert "already a sepweight directory (toyarch, 2 layers)" in line
    assert "llm-sepweight verify" in line and "arch=" not in line and "decider" not in line
    unfinished = tmp_path / "unfinished"
    shutil.copytree(converted, unfinished)
    (unfinished / "manifest.json").unlink()
    assert "did not finish" in sw.cli_error("convert", unfinished, tmp_path / "o")


def test_other_convert_errors(sw, checkpoints, tmp_path):
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(checkpoints["single"] / "model.safetensors", no_config)
    line = sw.cli_error("convert", no_config, tmp_path / "o")
    assert "cannot tell the architecture of" in line and "--arch" in line
    assert "arch=" not in line and "decider" not in line
    assert "'nope'" in sw.cli_error(
        "convert", checkpoints["single"], tmp_path / "o", "--arch", "nope"
    )
    assert "'int3'" in sw.cli_error(
        "convert", checkpoints["single"], tmp_path / "o", "--dtype", "int3"
    )
    assert "does not exist" in sw.cli_error("convert", tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "w.safetensors").write_bytes(b"\0")
    assert "must be a .gguf" in sw.cli_error("convert", tmp_path / "w.safetensors", tmp_path / "o")


def test_an_interrupt_is_one_line_with_exit_130(sw, converted, monkeypatch):
    import llm_sepweight.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "verify", interrupted)
    assert "interrupted" in sw.cli_error("verify", converted, code=130)


def test_a_real_process_prints_no_traceback(checkpoints, tmp_path):
    """The installed entry point, not just main(): a model package's error, exit 1, one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "llm_sepweight", "convert", str(checkpoints["single"]),
         str(tmp_path / "o"), "--arch", "falcon"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "'falcon' model package" in proc.stderr


def test_a_closed_pipe_is_not_an_error_message(converted):
    """`llm-sepweight files ... | head -1`: the reader leaves early; no traceback, no message."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_sepweight", "files", str(converted), "--part", "f"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # before the child (still importing torch) writes anything
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait() == 1
    assert stderr == ""


def test_main_returns_the_status(converted):
    assert main(["verify", str(converted)]) == 0
