"""Every ```python block of README.md and of each package's README runs as written.

How the blocks run (the convention a README example may rely on):

- The blocks of one README run in order, in one fresh Python process whose working directory is
  a fresh folder; each block gets a namespace of its own (an example never uses another's names).
- In that folder ``smollm2-sw`` is SmolLM2-135M-Instruct converted to sepweight (the session's
  ``smollm2_sepweight``, linked): the root README's first example converts the GGUF into it and
  finds it up to date, and later examples load it.
- A block that needs something else (a checkpoint at a made-up path, a certificate, a model
  object in scope) gets a preamble from :data:`SETUPS`, run before it in its namespace, keyed by
  README and a string the block contains.
- A block that its package's own test already runs (and checks the output of) is listed in
  :data:`RUN_ELSEWHERE` and not run twice. Each such key must match a block, so a renamed example
  is noticed.
- ```bash, ```text and bare ``` blocks are not run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEMBERS = sorted(p.parent.name for p in REPO.glob("*/pyproject.toml"))
READMES = ["README.md", *(f"{m}/README.md" for m in MEMBERS if (REPO / m / "README.md").exists())]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# README -> (the package test that runs some of its blocks, strings of those blocks; "*": all)
RUN_ELSEWHERE: dict[str, tuple[str, list[str]]] = {
    "llm_sepweight/README.md": ("tests/llm_sepweight/test_readme.py", ["prefix_decider("]),
    "llm_llama_model/README.md": ("tests/llm_llama_model/test_readme.py", ["def fibonacci(n):"]),
    "llm_falcon_model/README.md": ("tests/llm_falcon_model/test_falcon_readme.py", ["*"]),
    "socket_rpc/README.md": ("tests/socket_rpc/test_readme.py", ["class Node:"]),
    "llm_sampler/README.md": ("tests/llm_sampler/test_sampler_readme.py", ["VOCAB = 16"]),
    "llm_partial_run/README.md": (
        "tests/llm_partial_run/test_partial_run_readme.py",
        ['directory = "smollm2-sw"'],
    ),
}

TINY_HF_LLAMA = """
import torch, transformers
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
"""

TINY_GGUF = """
import os, gguf, numpy as np
rng = np.random.default_rng(0)
writer = gguf.GGUFWriter("path/to/model.gguf", "toyarch")
writer.add_block_count(2)
writer.add_tensor("token_embd.weight", rng.standard_normal((16, 8), dtype=np.float32))
for i in range(2):
    writer.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((8, 8), dtype=np.float32))
writer.add_tensor("output_norm.weight", rng.standard_normal(8, dtype=np.float32))
writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
writer.close()
"""

# README -> {a string of the block: preamble run before it}
SETUPS: dict[str, dict[str, str]] = {
    "llm_sepweight/README.md": {
        "path/to/Llama-3.2-1B": (
            "import os\nos.makedirs('path/to', exist_ok=True)\n"
            + TINY_HF_LLAMA
            + "model.save_pretrained('path/to/Llama-3.2-1B')\n"
            + TINY_GGUF
        ),  # fmt: skip
    },
    "socket_rpc/README.md": {
        'load_cert_chain("cert.pem", "key.pem")': (
            "import subprocess\n"
            "subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days',"
            " '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost',"
            " '-keyout', 'key.pem', '-out', 'cert.pem'], check=True, capture_output=True)\n"
        ),
    },
    "llm_sampler/README.md": {
        "HFCausalLM(model)": (
            TINY_HF_LLAMA + "import types\nfrom llm_sampler import score_continuations\n"
            "tokenizer = types.SimpleNamespace(eos_token_id=2)\n"
            "prompts, continuations = [[1, 5, 6], [1, 7]], [[8, 9], [10]]\n"
        ),
        "lambda ids, mask: part(ids, mask, cache)": (
            "import torch\nfrom llm_llama_model import LlamaConfig, LlamaPart\n"
            "from llm_sampler import generate, score_continuations\n"
            "torch.manual_seed(0)\n"
            "part = LlamaPart(LlamaConfig.from_hf({'model_type': 'llama', 'vocab_size': 64,"
            " 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,"
            " 'num_attention_heads': 4, 'num_key_value_heads': 2}), 'f')\n"
            "prompts, continuations = [[1, 5, 6], [1, 7]], [[8, 9], [10]]\n"
            "longest_prompt = 3\n"
        ),
    },
}

RUNNER = """
import json, sys, traceback
for block in json.load(open(sys.argv[1])):
    print(f"--- {block['name']}", flush=True)
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(block["setup"], block["name"] + " (setup)", "exec"), namespace)
        exec(compile(block["code"], block["name"], "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED {block['name']}", flush=True)
        sys.exit(1)
"""


def python_blocks(readme: str) -> list[tuple[str, str]]:
    """``(name, code)`` of each ```python block of ``readme`` (a path relative to the repo)."""
    text = (REPO / readme).read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 2  # the block's first line of code
        found.append((f"{readme}:{line}", match.group(1)))
    return found


def blocks_to_run(readme: str) -> list[dict[str, str]]:
    """The blocks this test runs for ``readme``, each with its preamble."""
    elsewhere = RUN_ELSEWHERE.get(readme, ("", []))[1]
    setups = SETUPS.get(readme, {})
    blocks = python_blocks(readme)
    for key in [*(k for k in elsewhere if k != "*"), *setups]:
        matching = [name for name, code in blocks if key in code]
        assert len(matching) == 1, f"{readme}: {key!r} matches {len(matching)} blocks, not 1"
    return [
        {"name": name, "code": code,
         "setup": next((s for key, s in setups.items() if key in code), "")}
        for name, code in blocks
        if "*" not in elsewhere and not any(key in code for key in elsewhere)
    ]  # fmt: skip


def run_blocks(blocks: list[dict[str, str]], folder: Path) -> subprocess.CompletedProcess:
    """Run the blocks in order in one fresh process in ``folder``."""
    (folder / "blocks.json").write_text(json.dumps(blocks))
    (folder / "run_blocks.py").write_text(RUNNER)
    return subprocess.run(
        [sys.executable, "run_blocks.py", "blocks.json"], cwd=folder, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip


# READMEs whose every block a package test already runs get no case here (not a skipped one)
@pytest.mark.parametrize("readme", [r for r in READMES if r != "README.md" and blocks_to_run(r)])
def test_package_readme_blocks_run(readme, tmp_path):
    blocks = blocks_to_run(readme)
    done = run_blocks(blocks, tmp_path)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.mark.slow
def test_root_readme_blocks_run(smollm2_sepweight, tmp_path):
    (tmp_path / "smollm2-sw").mkdir()
    for path in smollm2_sepweight.iterdir():  # links, so that nothing writes into the original
        (tmp_path / "smollm2-sw" / path.name).symlink_to(path)
    blocks = blocks_to_run("README.md")
    assert len(blocks) >= 8  # one per package at least
    done = run_blocks(blocks, tmp_path)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    out = done.stdout
    assert "30 ['manifest.json', 'begin.safetensors', 'mid.00000.safetensors'" in out
    assert out.count("Paris") >= 3  # load_part, the two nodes, the streamed model
    assert "tensor([3, 2, 1, 0])" in out and "[[4, 5, 6, 7], [10, 11, 12, 13]]" in out
    assert "StepStats(" in out and "streamed " in out


def test_root_readme_starts_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = first.strip().splitlines()
    assert lines[0].startswith("bash dev.sh demo") and lines[1].startswith("bash dev.sh test")


def test_the_package_tests_named_run_their_readme():
    """RUN_ELSEWHERE names real tests that read that README (else its blocks would run nowhere)."""
    for readme, (test, _) in RUN_ELSEWHERE.items():
        source = (REPO / test).read_text()
        assert readme.split("/")[0] in source and "README.md" in source, (readme, test)
