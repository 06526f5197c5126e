"""Token generation around any forward function: a generator of steps and a collecting call."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from .errors import SamplerError
from .forward import (
    ForwardFunc,
    Prompts,
    accepts_mask,
    call_forward,
    check_token_id,
    pad_rows,
    prompt_rows,
)
from .processors import LogitsProcessor
from .sampling import Sampler, SamplingConfig, make_sampler

logger = logging.getLogger(__name__)

STOPPED = -1
"""The value :func:`generate_stream` yields for a row that stopped at an earlier step."""

StopTokenIds = Sequence[int] | Sequence[Sequence[int]]


def generate_stream(
    forward_func: ForwardFunc,
    prompts: Prompts,
    *,
    max_new_tokens: int,
    cached: bool = False,
    sampling: SamplingConfig | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_token_ids: StopTokenIds | None = None,
    pad_token_id: int = 0,
    prompt_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, one ``LongTensor[B]`` per step, as they are chosen.

    Args:
        forward_func: ``f(ids) -> logits[B, T, V]`` or ``f(ids, mask) -> logits``; see
            :mod:`llm_sampler.forward`. Prompts of different lengths are left-padded, which
            needs a function that takes the mask.
        prompts: one prompt (list of ints, 1-D tensor) or a batch (list of lists, [B, T] tensor
            with an optional ``prompt_mask``).
        max_new_tokens: at most this many steps (and forward calls).
        cached: False passes the whole sequence every step; True passes the prompt once and then
            only the token chosen last, the function keeping its own KV cache.
        sampling: temperature, top-k/p, min-p, repetition penalty; greedy when None.
        logits_processors: extra ``(tokens, logits) -> logits`` callables, run after the
            repetition penalty and before temperature. ``tokens`` holds the prompt (padding as
            ``pad_token_id``, as in ``transformers``) and the tokens generated so far.
        seed, generator: make sampling reproducible (one of them at most).
        stop_token_ids: ids that end a row, shared (``[2]``) or one list per row (``[[2], [7]]``).
            The stop token is yielded; the row then yields :data:`STOPPED` (-1) until every row
            has stopped, when the generator ends.
        pad_token_id: the id fed to the model at padding positions and after a row stopped.
        prompt_mask: with a prompts tensor, marks its real tokens (left or right padding).
        device: where the ids are built; default the prompts tensor's device, else CPU.
    """
    rows = prompt_rows(prompts, prompt_mask)
    pad_token_id = check_token_id("pad_token_id", pad_token_id)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise SamplerError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if device is None and isinstance(prompts, torch.Tensor):
        device = prompts.device
    takes_mask = accepts_mask(forward_func)
    if not takes_mask and len({len(row) for row in rows}) > 1:
        raise SamplerError(
            "prompts have different lengths, so they are left-padded and the padding mask must "
            "reach the model: give a forward_func that accepts (input_ids, mask)"
        )
    sample = make_sampler(
        sampling, logits_processors=logits_processors, seed=seed, generator=generator
    )
    ids, mask = pad_rows(rows, pad_token_id, left=True, device=device)
    stops = _stop_table(stop_token_ids, len(rows), ids.device)
    logger.debug("generate: batch %d, prompt length %d, cached=%s", *ids.shape, cached)
    return _steps(
        forward_func,
        ids,
        mask if takes_mask else None,
        sample,
        stops,
        max_new_tokens,
        cached=cached,
        pad_token_id=pad_token_id,
    )


def generate(
    forward_func: ForwardFunc,
    prompts: Prompts,
    *,
    max_new_tokens: int,
    cached: bool = False,
    sampling: SamplingConfig | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_token_ids: StopTokenIds | None = None,
    pad_token_id: int = 0,
    prompt_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Generate and return the new tokens of every row: stop token included, nothing after it.

    Takes the same arguments as :func:`generate_stream`.
    """
    stream = generate_stream(
        forward_func, prompts, max_new_tokens=max_new_tokens, cached=cached, sampling=sampling,
        logits_processors=logits_processors, seed=seed, generator=generator,
        stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, prompt_mask=prompt_mask,
        device=device,
    )  # fmt: skip
    out: list[list[int]] = [[] for _ in prompt_rows(prompts, prompt_mask)]
    for step in stream:
        for row, token in zip(out, step.tolist(), strict=True):
            if token != STOPPED:
                row.append(token)
    return out


def _steps(
    forward_func: ForwardFunc,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    sample: Sampler,
    stops: torch.Tensor,
    max_new_tokens: int,
    *,
    cached: bool,
    pad_token_id: int,
) -> Iterator[torch.Tensor]:
    batch, prompt_len = ids.shape
    tokens = torch.full(
        (batch, prompt_len + max_new_tokens), pad_token_id, dtype=torch.long, device=ids.device
    )
    tokens[:, :prompt_len] = ids
    full_mask = None
    if mask is not None:
        full_mask = torch.ones(tokens.shape, dtype=torch.bool, device=ids.device)
        full_mask[:, :prompt_len] = mask
    stopped = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        end = prompt_len + step
        start = end - 1 if cached and step > 0 else 0
        step_mask = None if full_mask is None else full_mask[:, start:end]
        logits = call_forward(forward_func, tokens[:, start:end], step_mask)
        with torch.no_grad():
            chosen = sample(tokens[:, :end], logits[:, -1, :]).to(ids.device)
        chosen = chosen.masked_fill(stopped, pad_token_id)
        tokens[:, end] = chosen
        yield chosen.masked_fill(stopped, STOPPED)
        stopped |= (chosen[:, None] == stops).any(dim=1)
        if bool(stopped.all()):
            return


def _stop_table(
    stop_token_ids: StopTokenIds | None, batch: int, device: torch.device
) -> torch.Tensor:
    """``LongTensor[B, S]`` of each row's stop ids, padded with -1 (never a sampled id)."""
    if stop_token_ids is None:
        return torch.full((batch, 1), -1, dtype=torch.long, device=device)
    per_row = list(stop_token_ids)
    if all(isinstance(s, int) and not isinstance(s, bool) for s in per_row):
        per_row = [per_row] * batch
    if len(per_row) != batch:
        raise SamplerError(
            f"stop_token_ids has {len(per_row)} rows for a batch of {batch}; give one list per "
            "row or a flat list shared by all rows"
        )
    lists = []
    for i, row in enumerate(per_row):
        if isinstance(row, int) or not all(isinstance(s, int) and s >= 0 for s in row):
            raise SamplerError(
                f"stop_token_ids row {i} must be a list of int ids >= 0, got {row!r}"
            )
        lists.append(list(row))
    width = max(1, max(len(row) for row in lists))
    table = torch.full((batch, width), -1, dtype=torch.long)
    for i, row in enumerate(lists):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return table.to(device)
