"""Numerics equal to transformers' FalconForCausalLM for every variant, split into three parts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm_falcon_model import FalconPart

ATOL = 1e-4
STEPS = 20  # cached decode steps checked against transformers
PADDED_STEPS = 8  # decode steps of the padded batch (each row also runs alone)


def hf_greedy(model, ids: torch.Tensor, steps: int = STEPS) -> list[torch.Tensor]:
    """transformers' logits for the prompt, then for each of ``steps`` cached greedy steps."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits = [out.logits]
        for _ in range(steps):
            token = logits[-1][:, -1:].argmax(-1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    return logits


def test_three_parts_match_transformers_prefill_and_decode(variant, kit, tmp_path):
    model = kit.hf_falcon(variant)
    parts = kit.dump_parts(model, tmp_path)
    ids = torch.randint(0, kit.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = hf_greedy(model, ids)

    caches = [part.new_cache(2, 7 + STEPS) for part in parts]
    got = kit.run_chain(parts, ids, caches=caches)
    assert got.dtype == torch.float32 and got.shape == (2, 7, kit.VOCAB)
    torch.testing.assert_close(got, expected[0], atol=ATOL, rtol=0)
    for previous, want in zip(expected[:-1], expected[1:], strict=True):
        token = previous[:, -1:].argmax(-1)  # transformers' greedy token ...
        assert torch.equal(got[:, -1:].argmax(-1), token)  # ... is ours too
        got = kit.run_chain(parts, token, caches=caches)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert all(cache.length == 7 + STEPS for cache in caches)


@pytest.mark.parametrize("variant_name", ["falcon-7b", "falcon-40b", "falcon-rw-alibi"])
def test_same_greedy_tokens_as_transformers_generate(variant_name, kit, tmp_path):
    model = kit.hf_falcon(variant_name, seed=3)
    parts = kit.dump_parts(model, tmp_path)
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    caches = [part.new_cache(1, 4 + STEPS) for part in parts]
    tokens, x = ids, ids
    for _ in range(STEPS):
        x = kit.run_chain(parts, x, caches=caches)[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, x], dim=1)
    assert torch.equal(tokens, want)


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask ``[B, T]`` with each prompt right-aligned (padding id 0 on the left)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38]]


def test_left_padded_batch_equals_each_prompt_alone(variant, kit, tmp_path):
    model = kit.hf_falcon(variant)
    parts = kit.dump_parts(model, tmp_path)
    alone = [hf_greedy(model, torch.tensor([p]), PADDED_STEPS) for p in PROMPTS]

    ids, mask = left_pad(PROMPTS)
    caches = [part.new_cache(len(PROMPTS), ids.shape[1] + PADDED_STEPS) for part in parts]
    got = kit.run_chain(parts, ids, mask=mask, caches=caches)
    for row, prompt in enumerate(PROMPTS):
        real = got[row, ids.shape[1] - len(prompt) :]
        torch.testing.assert_close(real, alone[row][0][0], atol=ATOL, rtol=0)
    for step in range(1, PADDED_STEPS + 1):
        tokens = got[:, -1:].argmax(-1)
        got = kit.run_chain(parts, tokens, caches=caches)
        for row in range(len(PROMPTS)):
            assert int(tokens[row]) == int(alone[row][step - 1][0, -1].argmax())
            torch.testing.assert_close(got[row], alone[row][step][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant_name", ["falcon-40b", "falcon-rw-alibi"])
def test_uncached_padded_batch_equals_alone(variant_name, kit, tmp_path):
    model = kit.hf_falcon(variant_name)
    parts = kit.dump_parts(model, tmp_path)
    ids, mask = left_pad(PROMPTS)
    got = kit.run_chain(parts, ids, mask=mask.bool())
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got[row, ids.shape[1] - len(prompt) :], want, atol=ATOL, rtol=0)


def test_chunked_prefill_equals_one_shot(variant, kit, tmp_path):
    model = kit.hf_falcon(variant)
    parts = kit.dump_parts(model, tmp_path)
    ids = torch.randint(1, kit.VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # the second row is a left-padded 6-token prompt
    whole = kit.run_chain(parts, ids, mask=mask)
    caches = [part.new_cache(2, 16) for part in parts]
    first = kit.run_chain(parts, ids[:, :4], mask=mask[:, :4], caches=caches)
    second = kit.run_chain(parts, ids[:, 4:], mask=mask[:, 4:], caches=caches)
    chunked = torch.cat([first, second], dim=1)
    torch.testing.assert_close(chunked[0], whole[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked[1, 3:], whole[1, 3:], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "specs", [("f",), ("b", "0-3", "e"), ("b 0-2", "2-3 e"), ("b 0-1", "1-3 e")]
)
def test_any_split_gives_the_same_logits(specs, kit, tmp_path):
    model = kit.hf_falcon("falcon-40b")
    parts = kit.dump_parts(model, tmp_path, specs=specs)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = model(ids).logits
    caches = [part.new_cache(1, 8) for part in parts]
    torch.testing.assert_close(kit.run_chain(parts, ids, caches=caches), want, atol=ATOL, rtol=0)


def test_cache_holds_only_the_kv_heads(variant, kit, tmp_path):
    model = kit.hf_falcon(variant)
    parts = kit.dump_parts(model, tmp_path)
    config = parts[0].config
    expected_kv = {"falcon-7b": 1, "falcon-40b": 2, "falcon2-11b": 2, "rope-linear": 1}
    kv_heads = expected_kv.get(variant, config.num_heads)
    cache = parts[1].new_cache(3, 10)
    assert [tuple(layer.k.shape) for layer in cache.layers] == [(3, kv_heads, 10, config.head_dim)]
    assert cache.bytes_per_token() == 2 * 1 * kv_heads * config.head_dim * 4
    assert config.kv_bytes_per_token(4) == 2 * 3 * kv_heads * config.head_dim * 4


def test_two_caches_on_one_part_do_not_interfere(kit, tmp_path):
    parts = kit.dump_parts(kit.hf_falcon("falcon-7b"), tmp_path, specs=("f",))
    (part,) = parts
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[9, 8, 7, 6]])
    alone_a = part(a, cache=part.new_cache(1, 8))
    alone_b = part(b, cache=part.new_cache(1, 8))
    cache_a, cache_b = part.new_cache(1, 8), part.new_cache(1, 8)
    got_a = part(a, cache=cache_a)
    got_b = part(b, cache=cache_b)
    torch.testing.assert_close(got_a, alone_a, atol=0, rtol=0)
    torch.testing.assert_close(got_b, alone_b, atol=0, rtol=0)
    assert (cache_a.length, cache_b.length) == (3, 4)


def test_rope_scaling_factor_is_applied(kit, tmp_path):
    (part,) = kit.dump_parts(kit.hf_falcon("rope-linear"), tmp_path, specs=("f",))
    unscaled = FalconPart(dataclasses.replace(part.config, rope_linear_factor=1.0), "f")
    unscaled.load_state_dict(part.state_dict())
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    assert (part(ids) - unscaled(ids)).abs().max() > 1e-2


def test_bfloat16_part_tracks_transformers(kit, tmp_path):
    model = kit.hf_falcon("falcon-40b")
    parts = kit.dump_parts(model, tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in parts)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        want = model.to(torch.bfloat16)(ids).logits.float()
    caches = [part.new_cache(1, 8) for part in parts]
    assert caches[1].layers[0].k.dtype == torch.bfloat16
    got = kit.run_chain(parts, ids, caches=caches)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)


def test_driving_the_layers_one_by_one_equals_forward(kit, tmp_path):
    # What a layer-streaming driver does: prepare, each part.layers[i] with its cache, complete.
    (part,) = kit.dump_parts(kit.hf_falcon("falcon-rw-alibi"), tmp_path, specs=("f",))
    ids, mask = left_pad(PROMPTS)
    want = part(ids, mask, part.new_cache(3, 10))
    cache = part.new_cache(3, 10)
    with torch.no_grad():
        h, step = part.prepare(ids, mask, cache)
        for slot, layer in enumerate(part.layers):
            h = layer(h, step, cache.layers[slot])
        got = part.complete(h, step, cache)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert cache.length == ids.shape[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")
@pytest.mark.parametrize("variant_name", ["falcon-7b", "falcon-40b", "falcon-rw-alibi"])
def test_parts_on_cuda_match_transformers_on_cpu(variant_name, kit, tmp_path):
    model = kit.hf_falcon(variant_name)
    (part,) = kit.dump_parts(model, tmp_path, specs=("f",))
    part = part.to("cuda")
    ids, mask = left_pad(PROMPTS)
    cache = part.new_cache(3, ids.shape[1] + 4)
    got = part(ids.cuda(), mask.cuda(), cache).cpu()
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got[row, ids.shape[1] - len(prompt) :], want, atol=1e-3, rtol=0)
