"""The sampler: greedy for any dtype, reproducible seeds, and the right distribution."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import llm_sampler as S

NO_TOKENS = torch.zeros(1, 1, dtype=torch.long)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_temperature_zero_is_argmax_without_nan_for_any_dtype(dtype):
    # Values near the fp16 maximum overflow if divided by a small temperature in fp16.
    logits = torch.tensor([[-60000.0, 60000.0, 59000.0, 0.0], [1.0, 2.0, 3.0, -math.inf]])
    logits = logits.to(dtype)
    sample = S.make_sampler(S.SamplingConfig(temperature=0.0))
    assert sample(torch.zeros(2, 1, dtype=torch.long), logits).tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_sampled_in_float32(dtype):
    logits = torch.tensor([[60000.0, 59990.0, -60000.0]], dtype=dtype).expand(64, -1)
    sample = S.make_sampler(S.SamplingConfig(temperature=0.01), seed=0)
    chosen = sample(torch.zeros(64, 1, dtype=torch.long), logits)
    assert chosen.dtype == torch.long
    assert set(chosen.tolist()) <= {0, 1}


def test_greedy_applies_repetition_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.5]])
    sample = S.make_sampler(S.SamplingConfig(repetition_penalty=2.0))
    assert sample(torch.tensor([[1]]), logits).tolist() == [2]


def test_user_processor_runs_before_temperature():
    def ban_token_0(tokens, logits):
        return logits.index_fill(1, torch.tensor([0]), -math.inf)

    logits = torch.tensor([[10.0, 0.0, 0.0]]).expand(200, -1)
    sample = S.make_sampler(
        S.SamplingConfig(temperature=5.0), logits_processors=[ban_token_0], seed=1
    )
    assert 0 not in sample(torch.zeros(200, 1, dtype=torch.long), logits).tolist()


def test_seed_reproduces_the_same_draws():
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(3))
    tokens = torch.zeros(32, 1, dtype=torch.long)
    config = S.SamplingConfig(temperature=1.0, top_p=0.95)
    first = [S.make_sampler(config, seed=7)(tokens, logits) for _ in range(1)][0]
    again = S.make_sampler(config, seed=7)(tokens, logits)
    other = S.make_sampler(config, seed=8)(tokens, logits)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_generator_reproduces_the_same_draws():
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(4))
    tokens = torch.zeros(32, 1, dtype=torch.long)
    config = S.SamplingConfig(temperature=1.0)
    a = S.make_sampler(config, generator=torch.Generator().manual_seed(5))(tokens, logits)
    b = S.make_sampler(config, generator=torch.Generator().manual_seed(5))(tokens, logits)
    assert torch.equal(a, b)


def _chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


@pytest.mark.parametrize(
    ("config", "hf_chain"),
    [
        (
            S.SamplingConfig(temperature=0.8, top_k=5),
            [TemperatureLogitsWarper(0.8), TopKLogitsWarper(5)],
        ),
        (
            S.SamplingConfig(temperature=1.3, top_p=0.9, min_p=0.05),
            [TemperatureLogitsWarper(1.3), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)],
        ),
    ],
    ids=["temperature+top_k", "temperature+top_p+min_p"],
)
def test_empirical_distribution_matches_expected_probabilities(config, hf_chain):
    """Chi-square goodness of fit, 40k draws, fixed seed; expected = transformers' warpers."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0]])
    expected = LogitsProcessorList(hf_chain)(NO_TOKENS, logits.clone()).softmax(-1)[0]
    draws = 40_000
    sample = S.make_sampler(config, seed=1234)
    chosen = sample(torch.zeros(draws, 1, dtype=torch.long), logits.expand(draws, -1))
    counts = torch.bincount(chosen, minlength=logits.shape[1]).double()
    assert counts[expected == 0].sum() == 0, "a filtered token was sampled"
    dof = int((expected > 0).sum()) - 1
    # The 1e-6 upper quantile of chi-square with <= 7 degrees of freedom is below 40.
    assert dof >= 2
    assert _chi_square(counts, expected.double()) < 40.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"temperature": True},
        {"top_k": -1},
        {"top_k": 1.5},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"min_p": -0.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
    ],
)
def test_bad_sampling_config_raises(kwargs):
    with pytest.raises(S.SamplerError):
        S.SamplingConfig(**kwargs)


def test_negative_temperature_message_is_clear():
    with pytest.raises(S.SamplerError, match="temperature must be a finite number >= 0"):
        S.SamplingConfig(temperature=-1.0)


def test_seed_and_generator_together_is_an_error():
    with pytest.raises(S.SamplerError, match="either seed or generator"):
        S.make_sampler(seed=1, generator=torch.Generator())


@pytest.mark.parametrize(
    ("tokens", "logits"),
    [
        (torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3, 5)),  # [B, T, V], not [B, V]
        (torch.zeros(2, 1, dtype=torch.long), torch.zeros(5)),
        (torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, 5)),  # row counts differ
        (torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)),
    ],
)
def test_sampler_rejects_logits_of_the_wrong_shape(tokens, logits):
    with pytest.raises(S.SamplerError):
        S.make_sampler()(tokens, logits)
