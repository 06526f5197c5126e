"""Each processor keeps the same tokens with the same probabilities as transformers' processor."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import llm_sampler as S


def _random_case(seed: int, batch: int = 8, vocab: int = 50, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    return tokens, logits


def _assert_same_distribution(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same kept tokens (finite logits) and the same probabilities over them."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.isfinite(ours).any(dim=-1).all(), "a filter removed every token"
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (S.repetition_penalty(1.3), RepetitionPenaltyLogitsProcessor(1.3)),
        (S.repetition_penalty(0.7), RepetitionPenaltyLogitsProcessor(0.7)),
        (S.temperature(0.6), TemperatureLogitsWarper(0.6)),
        (S.temperature(1.7), TemperatureLogitsWarper(1.7)),
        (S.top_k(1), TopKLogitsWarper(1)),
        (S.top_k(7), TopKLogitsWarper(7)),
        (S.top_k(500), TopKLogitsWarper(500)),
        (S.top_p(0.05), TopPLogitsWarper(0.05)),
        (S.top_p(0.5), TopPLogitsWarper(0.5)),
        (S.top_p(0.9), TopPLogitsWarper(0.9)),
        (S.top_p(1.0), TopPLogitsWarper(1.0)),
        (S.min_p(0.0), MinPLogitsWarper(0.0)),
        (S.min_p(0.1), MinPLogitsWarper(0.1)),
        (S.min_p(0.5), MinPLogitsWarper(0.5)),
        (S.min_p(1.0), MinPLogitsWarper(1.0)),
    ],
    ids=lambda p: getattr(p, "__qualname__", type(p).__name__).split(".")[0],
)
def test_processor_matches_transformers(seed, ours, theirs):
    tokens, logits = _random_case(seed)
    _assert_same_distribution(ours(tokens, logits.clone()), theirs(tokens, logits.clone()))


def test_repetition_penalty_changes_only_seen_tokens():
    tokens = torch.tensor([[3, 3, 1]])
    logits = torch.tensor([[1.0, 2.0, -4.0, -2.0, 6.0]])
    out = S.repetition_penalty(2.0)(tokens, logits)
    assert out.tolist() == [[1.0, 1.0, -4.0, -4.0, 6.0]]


def test_repetition_penalty_ignores_ids_outside_the_vocabulary():
    tokens = torch.tensor([[-1, 9, 0]])
    logits = torch.tensor([[2.0, 2.0, 2.0]])
    assert S.repetition_penalty(2.0)(tokens, logits).tolist() == [[1.0, 2.0, 2.0]]


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    ours = S.top_k(2)(torch.zeros(1, 1, dtype=torch.long), logits)
    theirs = TopKLogitsWarper(2)(None, logits)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.isfinite(ours).sum() == 3


@pytest.mark.parametrize(
    "processor", [S.top_k(1), S.top_p(1e-9), S.min_p(1.0)], ids=["top_k", "top_p", "min_p"]
)
def test_filters_always_keep_the_most_likely_token(processor):
    # One row peaked, one flat (every token tied), one with -inf already present.
    logits = torch.tensor(
        [[0.0, 50.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0], [-math.inf, -math.inf, 0.5, -math.inf]]
    )
    out = processor(torch.zeros(3, 1, dtype=torch.long), logits)
    kept = torch.isfinite(out)
    assert kept.any(dim=1).all()
    # Every survivor of a maximal filter is a most likely token (any one of a tie).
    best = logits.amax(dim=1, keepdim=True)
    assert torch.equal(logits[kept], best.expand_as(logits)[kept])


@pytest.mark.parametrize("seed", range(3))
def test_full_chain_matches_transformers_order(seed):
    """Penalty -> temperature -> top-k -> top-p -> min-p, as transformers composes them."""
    tokens, logits = _random_case(seed, batch=16, vocab=80)
    config = S.SamplingConfig(
        temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2
    )
    ours = logits.clone()
    for process in S.make_logits_processors(config):
        ours = process(tokens, ours)
    theirs = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.8),
            MinPLogitsWarper(0.05),
        ]
    )(tokens, logits.clone())
    _assert_same_distribution(ours, theirs)


def test_greedy_chain_skips_warpers_but_keeps_penalty_and_user_processors():
    def user(tokens, logits):
        return logits

    chain = S.make_logits_processors(S.SamplingConfig(repetition_penalty=1.5, top_k=3), [user])
    assert len(chain) == 2 and chain[1] is user


def test_disabled_settings_add_no_processor():
    assert S.make_logits_processors(S.SamplingConfig(temperature=1.0)) == []


@pytest.mark.parametrize(
    ("factory", "value"),
    [
        (S.temperature, 0.0),
        (S.temperature, -1.0),
        (S.temperature, math.inf),
        (S.repetition_penalty, 0.0),
        (S.top_k, 0),
        (S.top_k, 2.5),
        (S.top_p, 0.0),
        (S.top_p, 1.5),
        (S.top_p, math.nan),
        (S.min_p, -0.1),
        (S.min_p, 1.01),
        (S.min_p, "0.1"),
    ],
)
def test_processor_factories_reject_bad_settings(factory, value):
    with pytest.raises(S.SamplerError):
        factory(value)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(-30, 30), st.just(-math.inf)), min_size=1, max_size=12
    ).filter(lambda v: any(math.isfinite(x) for x in v)),
    k=st.integers(1, 15),
    p=st.floats(1e-6, 1.0),
    m=st.floats(0.0, 1.0),
)
def test_any_filter_chain_keeps_a_best_token_and_leaves_kept_logits_alone(values, k, p, m):
    logits = torch.tensor([values])
    out = logits
    for process in (S.top_k(k), S.top_p(p), S.min_p(m)):
        out = process(torch.zeros(1, 1, dtype=torch.long), out)
    kept = torch.isfinite(out)
    assert kept.any()
    assert kept[0, logits[0].argmax()] or torch.equal(
        logits[kept], logits.max().expand(int(kept.sum()))
    )
    assert torch.equal(out[kept], logits[kept])
