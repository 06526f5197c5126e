"""Scoring equals a direct log-softmax; multiple choice picks what the scores say."""

from __future__ import annotations

import pytest
import torch

import llm_sampler as S

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
CONTINUATIONS = [[20, 21], [22, 23, 24, 25], [26]]


def _direct_logprobs(model, prompt, continuation):
    """Each sequence alone through the model, then log_softmax by hand."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)
    positions = range(len(prompt) - 1, len(prompt) + len(continuation) - 1)
    return torch.stack([logprobs[t, tok] for t, tok in zip(positions, continuation, strict=True)])


def _masked_forward(model):
    return S.HFCausalLM(model, cached=False)


def _plain_forward(model):
    def forward(ids):
        return model(ids).logits

    return forward


def _counting(forward):
    """Wrap forward (keeping whether it takes a mask) and record the shape of every call."""
    calls = []

    def with_mask(ids, mask):
        calls.append(tuple(ids.shape))
        return forward(ids, mask)

    def ids_only(ids):
        calls.append(tuple(ids.shape))
        return forward(ids)

    return (with_mask if S.accepts_mask(forward) else ids_only), calls


@pytest.mark.parametrize("make", [_masked_forward, _plain_forward], ids=["mask", "no-mask"])
def test_scores_equal_direct_log_softmax_in_one_forward(tiny_llama, make):
    forward, calls = _counting(make(tiny_llama))
    scores = S.score_continuations(forward, PROMPTS, CONTINUATIONS)
    assert len(calls) == 1 and calls[0][0] == 3
    assert scores.token_logprobs.shape == (3, 4)
    assert scores.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    for i, (prompt, cont) in enumerate(zip(PROMPTS, CONTINUATIONS, strict=True)):
        direct = _direct_logprobs(tiny_llama, prompt, cont)
        torch.testing.assert_close(scores.row(i), direct, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(scores.total[i], direct.sum(), rtol=1e-4, atol=1e-4)
    assert (scores.token_logprobs[~scores.mask] == 0).all()


def test_padding_does_not_change_scores(tiny_llama):
    together = S.score_continuations(_masked_forward(tiny_llama), PROMPTS, CONTINUATIONS)
    one_by_one = S.score_continuations(
        _masked_forward(tiny_llama), PROMPTS, CONTINUATIONS, batch_size=1
    )
    torch.testing.assert_close(together.total, one_by_one.total, rtol=1e-4, atol=1e-4)


def test_single_prompt_is_shared_by_all_continuations(tiny_llama):
    forward = _masked_forward(tiny_llama)
    shared = S.score_continuations(forward, [5, 6], [[7], [8, 9]])
    explicit = S.score_continuations(forward, [[5, 6], [5, 6]], [[7], [8, 9]])
    torch.testing.assert_close(shared.total, explicit.total)


def test_scores_of_a_known_distribution():
    """A model whose next-token distribution is fixed: scores are sums of known log-probs."""
    table = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))

    def forward(ids):
        return table.expand(ids.shape[0], ids.shape[1], 4)

    scores = S.score_continuations(forward, [[0], [1, 2]], [[0, 1], [3]])
    torch.testing.assert_close(
        scores.total, torch.log(torch.tensor([0.5 * 0.25, 0.125])), rtol=1e-6, atol=1e-6
    )


def test_multiple_choice_picks_what_the_scores_say(tiny_llama):
    forward = _masked_forward(tiny_llama)
    questions = [[5, 6, 7], [8, 9], [10]]
    options = [
        [[20], [21, 22], [23, 24, 25], [26]],
        [[30, 31], [32]],
        [[40], [41], [42]],
    ]
    answer = S.multiple_choice(forward, questions, options)
    assert answer.scores.shape == answer.probs.shape == (3, 4)
    for q, (question, opts) in enumerate(zip(questions, options, strict=True)):
        own = S.score_continuations(forward, question, opts).total
        torch.testing.assert_close(answer.scores[q, : len(opts)], own, rtol=1e-4, atol=1e-4)
        assert answer.best[q] == own.argmax()
        torch.testing.assert_close(answer.probs[q, : len(opts)], own.softmax(0), rtol=1e-4,
                                   atol=1e-5)  # fmt: skip
    assert answer.scores[1, 2:].eq(float("-inf")).all() and answer.probs[1, 2:].eq(0).all()
    torch.testing.assert_close(answer.probs.sum(1), torch.ones(3))


def test_multiple_choice_on_a_known_distribution_and_length_normalisation():
    table = torch.log(torch.tensor([0.5, 0.3, 0.2]))

    def forward(ids):
        return table.expand(ids.shape[0], ids.shape[1], 3)

    # Option 0: two tokens of p=0.5 (sum log 0.25, mean log 0.5); option 1: one token p=0.3.
    options = [[[0, 0], [1]]]
    assert S.multiple_choice(forward, [[2]], options).best.tolist() == [1]
    normalised = S.multiple_choice(forward, [[2]], options, length_normalize=True)
    assert normalised.best.tolist() == [0]
    torch.testing.assert_close(normalised.scores[0], torch.log(torch.tensor([0.5, 0.3])))


def test_multiple_choice_runs_all_questions_in_one_forward(tiny_llama):
    forward, calls = _counting(_plain_forward(tiny_llama))
    S.multiple_choice(forward, [[1], [2], [3]], [[[4], [5]]] * 3)
    assert calls == [(6, 2)]
    forward, calls = _counting(_plain_forward(tiny_llama))
    S.multiple_choice(forward, [[1], [2], [3]], [[[4], [5]]] * 3, batch_size=4)
    assert calls == [(4, 2), (2, 2)]


def test_scoring_refuses_a_cached_hf_adapter(tiny_llama):
    with pytest.raises(S.SamplerError, match="cached=False"):
        S.score_continuations(S.HFCausalLM(tiny_llama), [[1]], [[2]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: S.score_continuations(f, [[]], [[1]]), "prompt 0 is empty"),
        (lambda f: S.score_continuations(f, [[1]], [[2], []]), "continuation 1 is empty"),
        (lambda f: S.score_continuations(f, [[1], [2]], [[3], [4], [5]]), "2 prompts for 3"),
        (lambda f: S.score_continuations(f, [[1]], [[2]], batch_size=0), "batch_size"),
        (lambda f: S.multiple_choice(f, [[1], [2]], [[[3]]]), "one list of options"),
        (lambda f: S.multiple_choice(f, [[1]], [[]]), "no options"),
        (lambda f: S.multiple_choice(f, [[1]], [[4, 5]]), "list of token-id lists"),
    ],
)
def test_bad_scoring_input_raises(call, message):
    def forward(ids):
        return torch.zeros(*ids.shape, 8)

    with pytest.raises(S.SamplerError, match=message):
        call(forward)
