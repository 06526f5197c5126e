"""The README's runnable example runs and says what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "llm_sampler" / "README.md"


def _first_python_block_with(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return next(block for block in blocks if marker in block)


def test_readme_example_runs(capsys):
    namespace: dict[str, object] = {}
    exec(compile(_first_python_block_with("VOCAB = 16"), str(README), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "[[4, 5, 6, 7], [10, 11, 12, 13]]"
    assert namespace["answer"].best.tolist() == [1, 1]
    totals = namespace["scores"].total
    assert totals[1] < totals[0] < 0
    assert torch.isfinite(totals).all()


def test_llm_sampler_imports_torch_only():
    """The package must never pull in transformers or a model package of this repo."""
    code = (
        "import sys, llm_sampler\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "{'transformers', 'llm_llama_model', 'llm_falcon_model', 'llm_partial_run', "
        "'socket_rpc', 'llm_sepweight'}]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
