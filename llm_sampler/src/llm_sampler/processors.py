"""Logits processors: plain ``(tokens, logits) -> logits`` callables.

Each factory validates its setting once and returns a function. ``tokens`` is ``LongTensor[B, L]``
(every token of each row so far, prompt included) and ``logits`` is ``[B, V]`` for the next
position. Filters set the logits of dropped tokens to ``-inf`` and always keep at least one token
(the most likely one), as ``transformers``' processors do. A ``transformers`` ``LogitsProcessor``
has the same call signature and can be passed wherever one of these is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import SamplerError

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(tokens: LongTensor[B, L], logits: Tensor[B, V]) -> Tensor[B, V]``."""


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """Penalise every token that already occurs in a row (CTRL-style, at most once per token).

    A seen token's logit is divided by ``penalty`` when positive and multiplied by it when
    negative, so ``penalty > 1`` discourages repetition and ``penalty < 1`` encourages it.
    Token ids outside ``[0, V)`` in ``tokens`` are ignored.
    """
    penalty = _positive_float("repetition_penalty", penalty)

    def process(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        # Out-of-vocabulary ids land in an extra column that is dropped afterwards.
        ids = tokens.to(logits.device)
        ids = ids.masked_fill((ids < 0) | (ids >= vocab), vocab)
        seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, ids, True)
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(seen[:, :vocab], penalised, logits)

    return process


def temperature(value: float) -> LogitsProcessor:
    """Divide the logits by ``value`` (> 0). Temperature 0 is greedy and handled by the sampler."""
    value = _positive_float("temperature", value)

    def process(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits / value

    return process


def top_k(k: int) -> LogitsProcessor:
    """Keep the ``k`` highest logits (ties with the k-th are kept too); drop the rest."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SamplerError(f"top_k must be a positive int, got {k!r}")

    def process(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        return logits.masked_fill(logits < kth, -math.inf)

    return process


def top_p(p: float) -> LogitsProcessor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``.

    A token is dropped when the tokens ranked above it already hold at least ``p`` of the mass;
    ``p`` must lie in ``(0, 1]`` and ``p = 1`` keeps everything.
    """
    p = _unit_float("top_p", p, allow_zero=False)

    def process(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if p >= 1.0:
            return logits
        # Ascending order, so the cumulative sum of the tail is accurate for tiny probabilities.
        sorted_logits, order = torch.sort(logits, dim=-1)
        tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # this token and all below it
        # Dropped when the better-ranked tokens (1 - tail_mass) already hold at least p.
        drop_sorted = tail_mass <= 1.0 - p
        drop_sorted[:, -1] = False  # the most likely token always survives
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        return logits.masked_fill(drop, -math.inf)

    return process


def min_p(p: float) -> LogitsProcessor:
    """Drop tokens whose probability is below ``p`` times the probability of the most likely one."""
    p = _unit_float("min_p", p, allow_zero=True)

    def process(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        top = probs.amax(dim=-1, keepdim=True)
        drop = probs < p * top
        drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
        return logits.masked_fill(drop, -math.inf)

    return process


def _positive_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplerError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise SamplerError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _unit_float(name: str, value: float, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplerError(f"{name} must be a number, got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise SamplerError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)
