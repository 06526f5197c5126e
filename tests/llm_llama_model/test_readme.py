"""The package README's example runs as written (on the SmolLM2 directory converted once per run).

The example's own ``convert`` call is pointed at the session's converted directory (a symlink), so
the real model is not converted a second time; conversion itself is tested elsewhere.
"""

import re
from pathlib import Path

import llm_sepweight

README = Path(__file__).parents[2] / "llm_llama_model" / "README.md"


def test_readme_example_runs(smollm2_sepweight, tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)

    def converted(src, out, **kwargs):
        assert str(src).endswith(".gguf") and kwargs.get("dtype") == "float32"
        Path(out).symlink_to(smollm2_sepweight, target_is_directory=True)

    monkeypatch.setattr(llm_sepweight, "convert", converted)
    exec(compile(block, str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("'The capital of France is") and "Paris" in lines[0]
    assert lines[1].startswith("'def fibonacci(n):")
