"""Parity with transformers for each config feature: three chained parts, prefill + decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from llm_llama_model import LlamaPart, decider, load_part
from llm_sepweight import dump

SPECS = ("b 0-1", "1-3", "3-4 e")
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)
CASES = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim": dict(head_dim=24, num_key_value_heads=2),
    "biases": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=2),
    "rope_linear": dict(rope_theta=5000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3_tied": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(num_key_value_heads=2, sliding_window=48, model_type="mistral"),
    "wide_head": dict(vocab_size=1024, num_key_value_heads=2),  # head >= 8x wider than tall
}


def hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random transformers model; norms and biases randomised too so they are tested."""
    kwargs = dict(BASE, **CASES[case])
    torch.manual_seed(seed)
    if kwargs.pop("model_type", "llama") == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
            else:
                param.mul_(5.0)  # larger weights so differences in the math show in the logits
    return model.eval()


def split(
    model, directory: Path, specs=SPECS, dtype=torch.float32, pack: bool = True
) -> list[LlamaPart]:
    """The HF model's weights written by llm_sepweight.dump (placed by our decider), then each
    part loaded with load_part (``pack`` passed on), exactly as a node would."""
    hf_config = model.config.to_dict()
    dump(model.state_dict(), directory, decider(hf_config), arch="llama", config=hf_config,
         dtype=dtype)  # fmt: skip
    return [load_part(directory, spec, pack=pack) for spec in specs]


def run_chain(parts, x, mask=None, caches=None):
    for i, part in enumerate(parts):
        x = part(x, mask=mask, cache=caches[i] if caches else None)
    return x


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_and_decode_equal_transformers(case, tmp_path):
    model = hf_model(case)
    assert_prefill_and_decode_equal(model, split(model, tmp_path))


def assert_prefill_and_decode_equal(model, parts) -> None:
    """Chained ``parts`` against the transformers ``model``: logits within 1e-4 and the same
    greedy tokens, for a prefill of 2 x 7 tokens and 20 cached decode steps."""
    caches = [p.new_cache(2, 32) for p in parts]
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_out = model(ids, use_cache=True)
        ours = run_chain(parts, ids, caches=caches)
        torch.testing.assert_close(ours, hf_out.logits.float(), atol=1e-4, rtol=0)
        assert torch.equal(ours.argmax(-1), hf_out.logits.argmax(-1))
        past, token = hf_out.past_key_values, hf_out.logits[:, -1:].argmax(-1)
        for _ in range(20):
            hf_out = model(token, past_key_values=past, use_cache=True)
            ours = run_chain(parts, token, caches=caches)
            torch.testing.assert_close(ours, hf_out.logits.float(), atol=1e-4, rtol=0)
            assert torch.equal(ours.argmax(-1), hf_out.logits.argmax(-1))
            past, token = hf_out.past_key_values, hf_out.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("specs", [("f",), ("b", "0-4", "e"), ("b 0-2", "2-4", "e"), ("b 0-4 e",)])
def test_any_split_gives_the_same_logits(specs, tmp_path):
    model = hf_model("gqa")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            run_chain(split(model, tmp_path, specs), ids), model(ids).logits, atol=1e-4, rtol=0
        )


def test_uncached_whole_sequence_equals_cached_steps(tmp_path):
    parts = split(hf_model("rope_llama3_tied"), tmp_path)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    caches = [p.new_cache(1, 12) for p in parts]
    with torch.no_grad():
        whole = run_chain(parts, ids)
        steps = [run_chain(parts, ids[:, :5], caches=caches)]
        steps += [run_chain(parts, ids[:, t : t + 1], caches=caches) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_follow_transformers(dtype, tmp_path):
    model = hf_model("gqa")
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    parts = split(model, tmp_path, dtype=dtype)
    caches = [p.new_cache(1, 9) for p in parts]
    with torch.no_grad():
        expected = model.to(dtype)(ids).logits.float()
        ours = run_chain(parts, ids, caches=caches)
        step = run_chain(parts, ids[:, :1], caches=caches)
    assert ours.dtype == torch.float32 and parts[0](ids).dtype == dtype
    scale = expected.abs().max()
    torch.testing.assert_close(ours, expected, atol=0.02 * scale, rtol=0)
    assert torch.isfinite(step).all()


def greedy(parts, ids, mask, steps):
    """Prefill + ``steps`` greedy decode steps; returns (prefill logits, decode logits, tokens)."""
    caches = [p.new_cache(ids.shape[0], ids.shape[1] + steps) for p in parts]
    logits = run_chain(parts, ids, mask=mask, caches=caches)
    prefill, token, decoded, tokens = logits, logits[:, -1:].argmax(-1), [], []
    for _ in range(steps):
        tokens.append(token)
        logits = run_chain(parts, token, caches=caches)
        decoded.append(logits)
        token = logits[:, -1:].argmax(-1)
    return prefill, torch.cat(decoded, 1), torch.cat(tokens, 1)


@pytest.mark.parametrize("case", ["gqa", "rope_llama3_tied"])
def test_left_padded_batch_equals_each_prompt_alone(case, tmp_path):
    parts = split(hf_model(case), tmp_path)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=gen) for n in (3, 7, 1, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    with torch.no_grad():
        batch = greedy(parts, ids, mask, steps=10)
        for row, prompt in enumerate(prompts):
            alone = greedy(parts, prompt[None], None, steps=10)
            real = len(prompt)
            torch.testing.assert_close(
                batch[0][row, width - real :], alone[0][0], atol=1e-5, rtol=0
            )
            torch.testing.assert_close(batch[1][row], alone[1][0], atol=1e-5, rtol=0)
            assert torch.equal(batch[2][row], alone[2][0])


def test_masked_decode_step_leaves_a_row_untouched(tmp_path):
    """A row whose new token is padding (mask 0) keeps its state: later steps match a row that
    never saw that step."""
    parts = split(hf_model("gqa"), tmp_path)
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        caches = [p.new_cache(2, 8) for p in parts]
        run_chain(parts, ids, caches=caches)
        run_chain(parts, torch.tensor([[5], [9]]), mask=torch.tensor([[1], [0]]), caches=caches)
        both = run_chain(parts, torch.tensor([[7], [7]]), caches=caches)
        alone = [p.new_cache(1, 8) for p in parts]
        run_chain(parts, ids[1:], caches=alone)
        second = run_chain(parts, torch.tensor([[7]]), caches=alone)
    torch.testing.assert_close(both[1], second[0], atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parts_on_cuda_follow_the_cpu(dtype, tmp_path):
    model = hf_model("rope_llama3_tied")
    split(model, tmp_path, dtype=dtype)
    on_cpu = [load_part(tmp_path, s) for s in SPECS]
    on_gpu = [load_part(tmp_path, s, device="cuda") for s in SPECS]
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        caches = [p.new_cache(2, 8) for p in on_gpu]
        gpu = run_chain(on_gpu, ids.cuda(), mask.cuda(), caches)
        gpu_step = run_chain(on_gpu, ids[:, :1].cuda(), None, caches)
        caches = [p.new_cache(2, 8) for p in on_cpu]
        cpu = run_chain(on_cpu, ids, mask, caches)
        cpu_step = run_chain(on_cpu, ids[:, :1], None, caches)
    atol = 1e-3 if dtype == torch.float32 else 0.05 * cpu.abs().max().item()
    torch.testing.assert_close(gpu.cpu(), cpu, atol=atol, rtol=0)
    torch.testing.assert_close(gpu_step.cpu(), cpu_step, atol=atol, rtol=0)
