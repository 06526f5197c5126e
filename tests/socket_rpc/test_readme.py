"""The README's example runs as written and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "socket_rpc" / "README.md"


def test_readme_example_runs() -> None:
    text = README.read_text()
    example = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S)
    assert example is not None, "the README lost its example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example.group(1), str(README), "exec"), {"__name__": "readme"})
    lines = out.getvalue().splitlines()
    assert lines[0] == "[0. 2. 4. 6.]"
    assert "torch.bfloat16 (1, 3, 4) {'step': 0, 'kept': 3}" in lines
    assert lines[-1] == "KeyError 's1'"


def test_readme_states_the_threat_model() -> None:
    text = README.read_text()
    assert "## Security and threat model" in text and "never" in text
