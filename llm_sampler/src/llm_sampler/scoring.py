"""Scoring: log-probabilities of given continuations, and multiple choice built on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import SamplerError
from .forward import (
    ForwardFunc,
    Prompts,
    accepts_mask,
    call_forward,
    check_token_id,
    is_token_sequence,
    pad_rows,
)
from .forward import prompt_rows as _rows
from .hf import HFCausalLM


@dataclass(frozen=True)
class ContinuationScores:
    """Log-probabilities of N continuations, left-aligned: column j is continuation token j.

    Attributes:
        token_logprobs: ``float32[N, C]``, ``log p(token j | prompt, tokens < j)``; 0 at padding.
        mask: ``bool[N, C]``, True where column j is a real token of that continuation.
        total: ``float32[N]``, the sum over real tokens: ``log p(continuation | prompt)``.
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    total: torch.Tensor

    def row(self, index: int) -> torch.Tensor:
        """The per-token log-probabilities of continuation ``index``, without padding."""
        return self.token_logprobs[index, self.mask[index]]


@dataclass(frozen=True)
class MultipleChoice:
    """The answer to Q questions of up to N options each.

    Attributes:
        best: ``int64[Q]``, the index of the chosen option of each question.
        probs: ``float32[Q, N]``, softmax of ``scores`` over each question's options (0 where a
            question has fewer than N options).
        scores: ``float32[Q, N]``, each option's summed log-probability (mean per token with
            ``length_normalize``); ``-inf`` where a question has fewer options.
    """

    best: torch.Tensor
    probs: torch.Tensor
    scores: torch.Tensor


def score_continuations(
    forward_func: ForwardFunc,
    prompts: Prompts,
    continuations: Prompts,
    *,
    batch_size: int | None = None,
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
) -> ContinuationScores:
    """Score each continuation after its prompt in one batched forward (or ``batch_size`` chunks).

    ``prompts`` and ``continuations`` pair up row by row; a single prompt is shared by every
    continuation. ``forward_func`` gets complete sequences, so it must be stateless (uncached).
    A function that takes ``(ids, mask)`` gets left-padded rows and the mask; one that takes only
    ids gets right-padded rows, which is exact for a causal model since padding only ever follows
    the scored tokens. Padding never enters the scores.
    """
    if isinstance(forward_func, HFCausalLM) and forward_func.cached:
        raise SamplerError("scoring passes whole sequences: use HFCausalLM(model, cached=False)")
    prompt_list = _rows(prompts, what="prompt")
    cont_list = _rows(continuations, what="continuation")
    if len(prompt_list) == 1 and len(cont_list) > 1:
        prompt_list = prompt_list * len(cont_list)
    if len(prompt_list) != len(cont_list):
        raise SamplerError(
            f"{len(prompt_list)} prompts for {len(cont_list)} continuations: give one prompt per "
            "continuation, or a single prompt shared by all"
        )
    pad_token_id = check_token_id("pad_token_id", pad_token_id)
    step = _batch_size(batch_size, len(cont_list))
    width = max(len(c) for c in cont_list)
    parts = [
        _score_chunk(forward_func, prompt_list[i : i + step], cont_list[i : i + step],
                     width, pad_token_id, device)
        for i in range(0, len(cont_list), step)
    ]  # fmt: skip
    logprobs = torch.cat([p[0] for p in parts])
    mask = torch.cat([p[1] for p in parts])
    return ContinuationScores(logprobs, mask, logprobs.sum(dim=1))


def multiple_choice(
    forward_func: ForwardFunc,
    questions: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    *,
    length_normalize: bool = False,
    batch_size: int | None = None,
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
) -> MultipleChoice:
    """Pick the most likely option of every question, all questions scored in one batch.

    ``options[q]`` lists the continuations (token-id lists) offered after ``questions[q]``.
    Each option is scored by :func:`score_continuations` (summed log-probability, or the mean
    per token with ``length_normalize``); ``probs`` renormalises over a question's options.
    """
    question_list = _rows(list(questions), what="question")
    if isinstance(options, torch.Tensor) or len(options) != len(question_list):
        raise SamplerError(
            f"options must hold one list of options per question ({len(question_list)}), "
            f"got {len(options)}"
        )
    prompts, conts, owners = [], [], []
    for q, (question, opts) in enumerate(zip(question_list, options, strict=True)):
        if isinstance(opts, torch.Tensor) or not all(is_token_sequence(o) for o in opts):
            raise SamplerError(f"question {q}: options must be a list of token-id lists")
        if len(opts) == 0:
            raise SamplerError(f"question {q} has no options")
        for n, option in enumerate(_rows(list(opts), what=f"question {q} option")):
            prompts.append(question)
            conts.append(option)
            owners.append((q, n))
    scored = score_continuations(
        forward_func, prompts, conts, batch_size=batch_size, pad_token_id=pad_token_id,
        device=device,
    )  # fmt: skip
    values = scored.total
    if length_normalize:
        values = values / scored.mask.sum(dim=1)
    width = max(len(opts) for opts in options)
    scores = torch.full((len(question_list), width), float("-inf"), device=values.device)
    index = torch.tensor(owners, dtype=torch.long, device=values.device)
    scores[index[:, 0], index[:, 1]] = values
    return MultipleChoice(scores.argmax(dim=1), scores.softmax(dim=1), scores)


def _score_chunk(
    forward_func: ForwardFunc,
    prompts: list[list[int]],
    conts: list[list[int]],
    width: int,
    pad_token_id: int,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[n, width]`` and mask of one chunk, from a single forward call."""
    takes_mask = accepts_mask(forward_func)
    ids, mask = pad_rows(
        [p + c for p, c in zip(prompts, conts, strict=True)], pad_token_id, left=takes_mask,
        device=device,
    )  # fmt: skip
    logits = call_forward(forward_func, ids, mask if takes_mask else None)  # [n, T, V]
    length = ids.shape[1]
    dev = logits.device
    prompt_len = torch.tensor([len(p) for p in prompts], device=dev)
    cont_len = torch.tensor([len(c) for c in conts], device=dev)
    offset = length - prompt_len - cont_len if takes_mask else torch.zeros_like(prompt_len)
    column = torch.arange(width, device=dev)
    real = column[None, :] < cont_len[:, None]  # [n, width]
    # Position t's logits predict the token at t + 1; padding columns are clamped, then zeroed.
    position = (offset + prompt_len - 1)[:, None] + column[None, :]
    position = position.clamp(max=length - 2)
    picked = logits.gather(1, position[..., None].expand(-1, -1, logits.shape[-1]))
    target = ids.to(dev).gather(1, position + 1)
    logprobs = picked.float().log_softmax(dim=-1).gather(2, target[..., None]).squeeze(2)
    return logprobs.masked_fill(~real, 0.0), real


def _batch_size(batch_size: int | None, total: int) -> int:
    if batch_size is None:
        return total
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SamplerError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    return batch_size
