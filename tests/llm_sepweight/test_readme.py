"""The package README's first example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[2] / "llm_sepweight" / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "[2, 3] ['norm.weight']" in out
    assert "['layers.0.w', 'layers.1.w', 'norm.weight']" in out
