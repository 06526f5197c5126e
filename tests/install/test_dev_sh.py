"""``dev.sh`` prints its usage for a missing or unknown argument, before installing anything."""

import subprocess
from pathlib import Path

import pytest

DEV_SH = Path(__file__).parents[2] / "dev.sh"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ([], "no command given"),
        (["bench"], "bench needs a NAME"),
        (["bench", "no_such_bench"], "no benchmark bench/no_such_bench.py"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_usage_for_a_missing_or_unknown_argument(args, reason):
    proc = subprocess.run(["bash", str(DEV_SH), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: bash dev.sh {demo|test")
    assert "sepweight" in proc.stderr  # the bench names are listed
    assert f"dev.sh: {reason}" in proc.stderr
    assert "unbound variable" not in proc.stderr and proc.stdout == ""
