"""``llm-partial-run generate`` end to end on SmolLM2: over two node processes (the tokenizer
fetched from a node) and in this process (whole, and with its layers streamed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import llm_sampler
from llm_partial_run.cli import main

pytestmark = pytest.mark.slow
PROMPT = "What is the capital of France?"
NEW = 12


@pytest.fixture(scope="module")
def expected(smollm2_transformers) -> str:
    """What transformers' model and tokenizer answer to the chat prompt, greedy."""
    model, tokenizer = smollm2_transformers
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = llm_sampler.generate(
        llm_sampler.HFCausalLM(model), [ids], max_new_tokens=NEW, cached=True,
        stop_token_ids=[tokenizer.eos_token_id],
    )[0]  # fmt: skip
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_generate_over_two_nodes(smollm2_sepweight, shared_nodes, expected):
    nodes = shared_nodes(smollm2_sepweight, ("b 0-15", "15-30 e"))
    done = subprocess.run(
        [sys.executable, "-m", "llm_partial_run", "generate", "--nodes", ",".join(nodes),
         "--prompt", PROMPT, "--chat", "--max-new-tokens", str(NEW), "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
    assert expected.strip()


@pytest.mark.parametrize("extra", [[], ["--resident-layers", "2"], ["--parts", "b 0-9,9-30 e"]])
def test_generate_in_this_process(smollm2_sepweight, expected, capsys, extra):
    status = main(["generate", str(smollm2_sepweight), "--prompt", PROMPT, "--chat",
                   "--max-new-tokens", str(NEW), *extra])  # fmt: skip
    out = capsys.readouterr()
    assert status == 0, out.err
    assert out.out == expected + "\n"


def test_generate_errors_are_one_line(capsys, smollm2_sepweight):
    assert main(["generate", "--prompt", "x"]) == 1
    assert main(["generate", "--nodes", "127.0.0.1:1", "--prompt", "x", "--timeout", "2"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "give either a sepweight DIR" in lines[0]
    assert "node 127.0.0.1:1: cannot connect" in lines[1]
