import subprocess
import sys

import pytest

from llm_sepweight import read_manifest
from llm_sepweight.cli import main


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(*args, ok=True):
    """Run the command line in this process (importing torch once), capturing its output."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    proc = Result(code, out.getvalue(), err.getvalue())
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def test_python_dash_m_runs_the_command_line(tiny_gguf, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llm_sepweight", "convert", str(tiny_gguf), str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "o" / "manifest.json").is_file()


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "sw"
    proc = run("convert", tiny_gguf, out, "--dtype", "fp16")
    assert "2 layers" in proc.stdout and "float16" in proc.stdout
    return out


def test_help_lists_every_command():
    out = run("--help").stdout
    for word in ("convert", "info", "verify", "files", "part specs", "examples"):
        assert word in out
    for command in ("convert", "info", "verify", "files"):
        assert f"usage: llm-sepweight {command}" in run(command, "--help").stdout


def test_convert_info_verify(converted):
    assert read_manifest(converted).dtype == "float16"
    info = run("info", converted).stdout
    assert "toyarch" in info and "layers      2" in info
    assert "ok:" in run("verify", converted).stdout


def test_files_prints_one_path_per_line(converted):
    lines = run("files", converted, "--part", "1-2 e").stdout.splitlines()
    assert [line.rsplit("/", 1)[1] for line in lines] == [
        "manifest.json", "mid.00001.safetensors", "end.safetensors"
    ]  # fmt: skip


def test_errors_exit_1_with_a_message(converted, tmp_path):
    proc = run("files", converted, "--part", "b 0-2x", ok=False)
    assert proc.returncode == 1 and "'0-2x'" in proc.stderr
    proc = run("info", tmp_path, ok=False)
    assert "manifest.json is missing" in proc.stderr
    (converted / "mid.00000.safetensors").write_bytes(b"broken")
    proc = run("verify", converted, ok=False)
    assert "mid.00000.safetensors" in proc.stderr


def test_missing_argument_is_a_usage_error():
    proc = run("files", "somewhere", ok=False)
    assert proc.returncode == 2 and "--part" in proc.stderr
