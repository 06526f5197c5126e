"""The real SmolLM2-135M-Instruct: GGUF -> llm_sepweight.convert -> this package vs transformers."""

from __future__ import annotations

import json

import pytest
import torch

from llm_llama_model import load_part
from llm_sepweight import load
from llm_slice_core import InputError

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot")
STEPS = 32


def hf_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    out = model(ids, use_cache=True)
    token, tokens = out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        tokens.append(token)
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return torch.cat(tokens, 1)


def our_greedy(parts, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    caches = [p.new_cache(ids.shape[0], ids.shape[1] + steps) for p in parts]
    x, tokens = ids, []
    for step in range(steps):
        for part, cache in zip(parts, caches, strict=True):
            x = part(x, mask=mask if step == 0 else None, cache=cache)
        x = x[:, -1:].argmax(-1)
        tokens.append(x)
    return torch.cat(tokens, 1)


def test_converted_weights_equal_the_ones_transformers_loads(
    smollm2_sepweight, smollm2_transformers
):
    model, _ = smollm2_transformers
    hf = model.state_dict()
    weights = load(smollm2_sepweight, "f")
    assert weights.manifest.arch == "llama" and weights.manifest.num_layers == 30
    for index, layer in weights.layers.items():
        for key, tensor in layer.items():
            assert torch.equal(tensor, hf[f"model.layers.{index}.{key}"]), key
    assert torch.equal(weights.begin["embed_tokens.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(weights.end["lm_head.weight"], hf["lm_head.weight"])
    assert torch.equal(weights.end["norm.weight"], hf["model.norm.weight"])


@pytest.mark.parametrize("threads", [1, 2])
def test_32_greedy_tokens_equal_transformers(smollm2_sepweight, smollm2_transformers, threads):
    """Three parts, the prompts left-padded into one batch, against transformers on each alone;
    on two threads each decode-step product is cut into two blocks (see model._product)."""
    torch.set_num_threads(threads)  # (the conftest fixture restores the count)
    model, tokenizer = smollm2_transformers
    parts = [load_part(smollm2_sepweight, s) for s in ("b 0-10", "10-20", "20-30 e")]
    prompts = [tokenizer(p, return_tensors="pt").input_ids[0] for p in PROMPTS]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, True
    with torch.inference_mode():
        ours = our_greedy(parts, ids, mask, STEPS)
        for row, prompt in enumerate(prompts):
            expected = hf_greedy(model, prompt[None], STEPS)[0]
            assert ours[row].tolist() == expected.tolist(), tokenizer.decode(ours[row])


def test_prefill_logits_equal_transformers(smollm2_sepweight, smollm2_transformers):
    model, tokenizer = smollm2_transformers
    part = load_part(smollm2_sepweight, "f")
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.inference_mode():
        ours, theirs = part(ids), model(ids).logits
    # float32 rounding after 30 real layers depends on the summation order of the BLAS and SDPA
    # kernels the CPU gets (on an AMD EPYC without AVX-512 the difference is 1.2e-4 with logits up
    # to 27, 4e-6 of their scale): the bound scales with the logits (the 1e-4 of the issue is met
    # by the tiny configs in test_parity.py), and every position's top token must agree.
    torch.testing.assert_close(ours, theirs, atol=2e-5 * theirs.abs().max().item(), rtol=0)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_loading_a_middle_part_reads_only_its_layer_files(smollm2_sepweight, tmp_path):
    """Copy only manifest + mid.00008..15 elsewhere: part "8-16" loads and runs from that alone."""
    manifest = json.loads((smollm2_sepweight / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for i in range(8, 16):
        name = f"mid.{i:05d}.safetensors"
        (tmp_path / name).symlink_to(smollm2_sepweight / name)
    part = load_part(tmp_path, "8-16")
    assert len(part.layers) == 8 and not hasattr(part, "embed_tokens")
    hidden = part(torch.randn(1, 3, 576), cache=part.new_cache(1, 4))
    assert hidden.shape == (1, 3, 576) and torch.isfinite(hidden).all()
    with pytest.raises(Exception, match="begin.safetensors"):
        load_part(tmp_path, "b 0-8")
    with pytest.raises(InputError, match="hidden states"):
        part(torch.randn(1, 3, 575))
