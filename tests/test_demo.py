"""``llm-partial-run demo`` (what ``bash dev.sh demo`` runs), end to end and non-interactively.

The demo's cache directory holds a link to the SmolLM2 directory converted once per test run, so
the demo finds its model up to date instead of converting it again. Every node the demo started
must be gone when it ends: after a normal run, after SIGINT (Ctrl-C) once its nodes are up, and
after SIGKILL (the nodes then get SIGTERM from the kernel: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_partial_run.cli import main
from llm_partial_run.commands.demo import MODEL_NAME

pytestmark = pytest.mark.slow
TIMEOUT = 300.0
READY = re.compile(r"^node (\d) ready: part '([^']+)' at (\S+) \(pid (\d+)\)$")


@pytest.fixture
def cache_dir(smollm2_sepweight: Path, tmp_path: Path) -> Path:
    """A demo cache directory whose model is the session's converted SmolLM2 (up to date)."""
    cache = tmp_path / "cache"
    linked_files(smollm2_sepweight, cache / MODEL_NAME)
    return cache


def linked_files(source: Path, target: Path) -> None:
    """``target``: a folder of links to each file of ``source`` (a conversion that found it out
    of date would replace the links, never write into the shared converted model)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).symlink_to(path)


def _demo(cache_dir: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llm_partial_run", "demo", "--cache-dir", str(cache_dir),
           "--threads", "1", "--max-new-tokens", "16", *args]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _read_until_ready(proc: subprocess.Popen, nodes: int = 2) -> tuple[list[str], list[int]]:
    """The demo's stdout lines up to its last node's ready line, and the nodes' pids."""
    lines, pids = [], []
    deadline = time.monotonic() + TIMEOUT
    while len(pids) < nodes:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no ready lines within {TIMEOUT} s: {lines}"
        line = proc.stdout.readline()
        assert line, f"the demo ended early: {lines} {proc.stderr.read()}"
        lines.append(line.rstrip("\n"))
        if match := READY.match(lines[-1]):
            pids.append(int(match.group(4)))
    return lines, pids


def _group_alive(pid: int) -> bool:
    """Whether any process is left in the process group the node led (its pid)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a process of another user took the id
        return False
    return True


def _wait_groups_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """The groups still alive after waiting up to ``timeout`` for every one to end."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _group_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for an exit, not waiting for a server: nothing to block on
    return alive


def test_demo_answers_on_two_nodes_and_stops_them(cache_dir):
    proc = _demo(cache_dir)
    head, pids = _read_until_ready(proc)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    text = "\n".join(head) + "\n" + out
    assert "up to date" in head[1]  # the model was not converted again
    assert "--token-file" in text and "(0600)" in text
    answer = next(line for line in text.splitlines() if line.startswith("answer: "))
    assert "Paris" in answer
    assert re.search(r"\d+ tokens in [\d.]+ s: [\d.]+ tokens/s", text)
    assert text.count(" compute ") == 2 and "transfer" in text and "client (this process)" in text
    assert "stopped 2 nodes" in text
    assert _wait_groups_gone(pids, timeout=0) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_demo_interrupted_once_the_nodes_are_up_leaves_no_node(cache_dir, sig):
    proc = _demo(cache_dir, "--max-new-tokens", "64")
    try:
        head, pids = _read_until_ready(proc)
        assert all(_group_alive(p) for p in pids)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "interrupted" in err and "stopped 2 nodes" in out
        assert _wait_groups_gone(pids, timeout=0) == []
    else:  # the demo had no chance to clean up: the kernel's parent-death signal stops them
        assert proc.returncode == -signal.SIGKILL
        assert _wait_groups_gone(pids) == []
        token_dir = re.search(r"a fresh token in (\S+)/token", "\n".join(head)).group(1)
        shutil.rmtree(token_dir)  # the demo left it behind (and said where)


def test_demo_streamed_in_one_process(cache_dir, capsys):
    status = main(["demo", "--cache-dir", str(cache_dir), "--stream", "2",
                   "--max-new-tokens", "8"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    answer = next(line for line in out.splitlines() if line.startswith("answer: "))
    assert "Paris" in answer
    assert "at most 2 of 30 layers at once" in out
    assert re.search(r"streamed \d+ layers in \d+ calls", out)


def test_demo_refuses_a_bad_stream_count(cache_dir, capsys):
    assert main(["demo", "--cache-dir", str(cache_dir), "--stream", "0"]) == 1
    assert "--stream takes a layer count >= 1" in capsys.readouterr().err
