"""The README's Python example runs as written (on SmolLM2 converted by the session fixture)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "llm_partial_run" / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(smollm2_sepweight, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a Python example"
    code = blocks[0].replace('directory = "smollm2-sw"', f"directory = {str(smollm2_sepweight)!r}")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "Paris" in out and "StepStats(" in out
