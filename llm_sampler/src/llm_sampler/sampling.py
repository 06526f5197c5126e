"""Sampling settings and the sampler that turns next-token logits into token ids."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import processors as P
from .errors import SamplerError

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(tokens: LongTensor[B, L], logits: Tensor[B, V]) -> LongTensor[B]``: next token per row."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. The defaults are greedy decoding with no penalty.

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: keep the k most likely tokens; 0 disables the filter.
        top_p: nucleus filter in (0, 1]; 1 disables it.
        min_p: drop tokens below ``min_p`` times the top probability, in [0, 1]; 0 disables it.
        repetition_penalty: > 0; 1 disables it. Applies to greedy decoding too.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise SamplerError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise SamplerError(f"top_k must be an int >= 0 (0 = off), got {k!r}")
        # The processor factories validate the remaining ranges with the same messages.
        P.top_p(self.top_p)
        P.min_p(self.min_p)
        P.repetition_penalty(self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always chosen (temperature 0)."""
        return self.temperature == 0


def make_logits_processors(
    config: SamplingConfig, extra: Sequence[P.LogitsProcessor] = ()
) -> list[P.LogitsProcessor]:
    """The processor chain for ``config``, in ``transformers``' order.

    Order: repetition penalty, then ``extra`` (user processors), then — unless greedy —
    temperature, top-k, top-p, min-p. Settings that change nothing are left out.
    """
    chain: list[P.LogitsProcessor] = []
    if config.repetition_penalty != 1.0:
        chain.append(P.repetition_penalty(config.repetition_penalty))
    chain.extend(extra)
    if config.greedy:
        return chain
    if config.temperature != 1.0:
        chain.append(P.temperature(config.temperature))
    if config.top_k > 0:
        chain.append(P.top_k(config.top_k))
    if config.top_p < 1.0:
        chain.append(P.top_p(config.top_p))
    if config.min_p > 0.0:
        chain.append(P.min_p(config.min_p))
    return chain


def make_sampler(
    config: SamplingConfig | None = None,
    *,
    logits_processors: Sequence[P.LogitsProcessor] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Sampler:
    """Build ``sample(tokens, logits) -> next_tokens`` for ``config`` (greedy when None).

    Logits of any float dtype are processed in float32, so fp16/bf16 logits never overflow into
    NaN. ``seed`` (a generator is made on the logits' device at the first call) or ``generator``
    makes sampling reproducible; a sampler keeps its generator's state between calls, so build a
    new one to replay the same draws.
    """
    config = config if config is not None else SamplingConfig()
    if seed is not None and generator is not None:
        raise SamplerError("give either seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SamplerError(f"seed must be an int, got {seed!r}")
    chain = make_logits_processors(config, logits_processors)

    def sample(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        nonlocal generator
        _check_step_shapes(tokens, logits)
        scores = logits.float()
        for process in chain:
            scores = process(tokens, scores)
        if config.greedy:
            return scores.argmax(dim=-1)
        if generator is None and seed is not None:
            generator = torch.Generator(device=scores.device).manual_seed(seed)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return sample


def _check_step_shapes(tokens: torch.Tensor, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SamplerError(f"the sampler needs next-token logits of shape [B, V], got {shape}")
    if not logits.is_floating_point():
        raise SamplerError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise SamplerError(f"tokens must be a LongTensor of shape [B, L], got {shape}")
    if tokens.shape[0] != logits.shape[0]:
        raise SamplerError(
            f"tokens has {tokens.shape[0]} rows but logits has {logits.shape[0]}; they must match"
        )
