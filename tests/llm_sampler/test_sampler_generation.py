"""Generation: parity with transformers' generate, padding, stop tokens, caching, bad input."""

from __future__ import annotations

import pytest
import torch

import llm_sampler as S

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13]]


def _hf_greedy(model, prompts, max_new_tokens, **kwargs):
    """transformers' generate(do_sample=False) on left-padded prompts; new tokens only."""
    ids, mask = _left_pad(prompts)
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
        **kwargs,
    )  # fmt: skip
    return out[:, ids.shape[1] :].tolist()


def _left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_greedy_equals_transformers_generate_on_a_padded_batch(tiny_llama, cached):
    expected = _hf_greedy(tiny_llama, PROMPTS, 10)
    ours = S.generate(S.HFCausalLM(tiny_llama, cached=cached), PROMPTS, max_new_tokens=10,
                      cached=cached)  # fmt: skip
    assert ours == expected
    assert len({tuple(row) for row in ours}) == 3  # the rows really differ


def test_greedy_with_a_plain_function_without_mask(tiny_llama):
    prompt = [[3, 4, 5, 6]]

    def forward(ids):
        return tiny_llama(ids).logits

    assert S.generate(forward, prompt, max_new_tokens=8) == _hf_greedy(tiny_llama, prompt, 8)


def test_greedy_with_repetition_penalty_equals_transformers(tiny_llama):
    expected = _hf_greedy(tiny_llama, PROMPTS, 10, repetition_penalty=1.5)
    ours = S.generate(
        S.HFCausalLM(tiny_llama), PROMPTS, max_new_tokens=10, cached=True,
        sampling=S.SamplingConfig(repetition_penalty=1.5),
    )  # fmt: skip
    assert ours == expected
    assert ours != _hf_greedy(tiny_llama, PROMPTS, 10)


def test_padded_rows_generate_what_each_prompt_generates_alone(tiny_llama):
    batch = S.generate(S.HFCausalLM(tiny_llama), PROMPTS, max_new_tokens=6, cached=True)
    alone = [S.generate(S.HFCausalLM(tiny_llama), [p], max_new_tokens=6, cached=True)[0]
             for p in PROMPTS]  # fmt: skip
    assert batch == alone


def test_prompt_tensor_with_mask_equals_list_of_prompts(tiny_llama):
    ids, mask = _left_pad(PROMPTS)
    from_tensor = S.generate(S.HFCausalLM(tiny_llama), ids, prompt_mask=mask, max_new_tokens=5,
                             cached=True)  # fmt: skip
    from_lists = S.generate(S.HFCausalLM(tiny_llama), PROMPTS, max_new_tokens=5, cached=True)
    assert from_tensor == from_lists


def test_seeded_sampling_is_reproducible(tiny_llama):
    config = S.SamplingConfig(temperature=1.5, top_k=50, top_p=0.95)

    def run(seed):
        return S.generate(S.HFCausalLM(tiny_llama), PROMPTS, max_new_tokens=12, cached=True,
                          sampling=config, seed=seed)  # fmt: skip

    assert run(11) == run(11)
    assert run(11) != run(12)


def _recording_forward(vocab=10):
    """A forward function that logs its inputs; after token t it always predicts t + 1."""
    calls = []

    def forward(ids, mask):
        calls.append((ids.clone(), mask.clone()))
        logits = torch.zeros(ids.shape[0], ids.shape[1], vocab)
        return logits.scatter_(2, ((ids + 1) % vocab)[..., None], 5.0)

    return forward, calls


def test_cached_passes_prompt_once_then_only_new_tokens():
    forward, calls = _recording_forward()
    out = S.generate(forward, [[1, 2, 3], [4]], max_new_tokens=3, cached=True)
    assert out == [[4, 5, 6], [5, 6, 7]]
    assert [tuple(ids.shape) for ids, _ in calls] == [(2, 3), (2, 1), (2, 1)]
    assert calls[0][1].tolist() == [[True, True, True], [False, False, True]]
    assert calls[1][0].tolist() == [[4], [5]]
    assert calls[1][1].all()


def test_uncached_passes_the_whole_sequence_every_step():
    forward, calls = _recording_forward()
    S.generate(forward, [[1, 2, 3], [4]], max_new_tokens=3, cached=False)
    assert [tuple(ids.shape) for ids, _ in calls] == [(2, 3), (2, 4), (2, 5)]
    assert calls[2][0].tolist() == [[1, 2, 3, 4, 5], [0, 0, 4, 5, 6]]
    assert calls[2][1].tolist() == [[True] * 5, [False, False, True, True, True]]


def test_stop_tokens_per_row_and_stopped_marker():
    forward, calls = _recording_forward()
    steps = list(S.generate_stream(forward, [[1], [3]], max_new_tokens=10,
                                   stop_token_ids=[[3], [6]], cached=True))  # fmt: skip
    assert [s.tolist() for s in steps] == [[2, 4], [3, 5], [S.STOPPED, 6]]
    # A stopped row is fed pad_token_id (0) while the other row goes on.
    assert calls[2][0].tolist() == [[3], [5]]
    assert S.generate(forward, [[1], [3]], max_new_tokens=10, stop_token_ids=[[3], [6]]) == [
        [2, 3],
        [4, 5, 6],
    ]


def test_shared_stop_tokens_and_max_new_tokens():
    forward, _ = _recording_forward()
    assert S.generate(forward, [[1], [5]], max_new_tokens=4, stop_token_ids=[4]) == [
        [2, 3, 4],
        [6, 7, 8, 9],
    ]
    assert S.generate(forward, [[1], [5]], max_new_tokens=0) == [[], []]


def test_stream_yields_one_tensor_per_step_lazily():
    forward, calls = _recording_forward()
    stream = S.generate_stream(forward, [7], max_new_tokens=100)
    assert next(stream).tolist() == [8]
    assert next(stream).tolist() == [9]
    assert len(calls) == 2  # nothing is computed ahead of the consumer


def test_generation_does_not_leak_no_grad_to_the_caller():
    forward, _ = _recording_forward()
    for _ in S.generate_stream(forward, [1], max_new_tokens=2):
        assert torch.is_grad_enabled()


def test_different_lengths_need_a_function_that_takes_the_mask():
    with pytest.raises(S.SamplerError, match="accepts \\(input_ids, mask\\)"):
        S.generate(lambda ids: torch.zeros(*ids.shape, 5), [[1, 2], [3]], max_new_tokens=1)


@pytest.mark.parametrize("prompts", [[], [[]], [[1, 2], []], torch.zeros(2, 0, dtype=torch.long)])
def test_empty_prompt_raises(prompts):
    with pytest.raises(S.SamplerError, match="prompt"):
        S.generate(lambda ids, mask: torch.zeros(*ids.shape, 5), prompts, max_new_tokens=1)


@pytest.mark.parametrize(
    "bad_prompts", [[[1, -2]], [["a"]], "text", torch.tensor([[0.5]]), [[1.0, 2.0]]]
)
def test_prompts_that_are_not_token_ids_raise(bad_prompts):
    with pytest.raises(S.SamplerError):
        S.generate(lambda ids: torch.zeros(*ids.shape, 5), bad_prompts, max_new_tokens=1)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda ids: torch.zeros(ids.shape[0], 1, 5), "one position per input token"),
        (lambda ids: torch.zeros(ids.shape[0], ids.shape[1] + 1, 5), "one position"),
        (lambda ids: torch.zeros(ids.shape[0], 5), "expected"),
        (lambda ids: torch.zeros(ids.shape[0] + 1, ids.shape[1], 5), "expected"),
        (lambda ids: {"logits": torch.zeros(*ids.shape, 5)}, "HFCausalLM"),
    ],
)
def test_forward_returning_the_wrong_shape_raises(returned, message):
    with pytest.raises(S.SamplerError, match=message):
        S.generate(returned, [[1, 2, 3]], max_new_tokens=2)


def test_cached_forward_returning_all_positions_is_caught():
    full = torch.zeros(1, 50, 5)

    def forward(ids):  # ignores that cached mode passes only one new token
        return full[:, :3]

    with pytest.raises(S.SamplerError, match=r"input_ids of shape \(1, 1\)"):
        S.generate(forward, [[1, 2, 3]], max_new_tokens=2, cached=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": -1},
        {"max_new_tokens": 2.0},
        {"max_new_tokens": 2, "pad_token_id": -1},
        {"max_new_tokens": 2, "stop_token_ids": [[1], [2]]},  # two rows of stops for one row
        {"max_new_tokens": 2, "stop_token_ids": [-3]},
        {"max_new_tokens": 2, "seed": 1, "generator": torch.Generator()},
        {"max_new_tokens": 2, "prompt_mask": torch.ones(1, 2)},  # mask with list prompts
    ],
)
def test_bad_generation_arguments_raise(kwargs):
    with pytest.raises(S.SamplerError):
        S.generate(lambda ids: torch.zeros(*ids.shape, 5), [[1, 2]], **kwargs)


def test_hf_adapter_refuses_a_cache_of_another_batch_size(tiny_llama):
    forward = S.HFCausalLM(tiny_llama)
    S.generate(forward, [[1, 2], [3, 4]], max_new_tokens=2, cached=True)
    with pytest.raises(S.SamplerError, match="reset"):
        S.generate(forward, [[1, 2]], max_new_tokens=2, cached=True)
    forward.reset()
    assert S.generate(forward, [[1, 2]], max_new_tokens=2, cached=True) == S.generate(
        S.HFCausalLM(tiny_llama), [[1, 2]], max_new_tokens=2, cached=True
    )


class _IdsOnly(torch.nn.Module):
    def forward(self, ids):
        return torch.zeros(*ids.shape, 5)


class _IdsAndMask(torch.nn.Module):
    def forward(self, ids, mask):
        return torch.zeros(*ids.shape, 5).masked_fill(~mask[..., None], 1.0)


def test_accepts_mask_detection():
    assert not S.accepts_mask(_IdsOnly())  # Module.__call__ takes *args: forward decides
    assert S.accepts_mask(_IdsAndMask())
    assert S.generate(_IdsOnly(), [[1, 2]], max_new_tokens=2) == [[0, 0]]
    assert S.generate(_IdsAndMask(), [[1, 2], [3]], max_new_tokens=1) == [[0], [0]]
    assert S.accepts_mask(lambda ids, mask: ids)
    assert S.accepts_mask(lambda ids, mask=None: ids)
    assert S.accepts_mask(lambda *args: args)
    assert not S.accepts_mask(lambda ids: ids)
    assert not S.accepts_mask(lambda ids, *, mask=None: ids)


def test_a_transformers_processor_works_as_a_user_processor(tiny_llama):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    forward = S.HFCausalLM(tiny_llama)
    theirs = S.generate(forward, PROMPTS, max_new_tokens=8, cached=True,
                        logits_processors=[RepetitionPenaltyLogitsProcessor(1.5)])  # fmt: skip
    ours = S.generate(S.HFCausalLM(tiny_llama), PROMPTS, max_new_tokens=8, cached=True,
                      sampling=S.SamplingConfig(repetition_penalty=1.5))  # fmt: skip
    assert theirs == ours
