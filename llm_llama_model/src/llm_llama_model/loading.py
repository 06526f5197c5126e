"""Build a part on the meta device and assign memory-mapped weights from a sepweight directory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from llm_sepweight import PartSpec, load

from . import rope
from .config import LlamaConfig
from .errors import LlamaModelError
from .model import LlamaPart

log = logging.getLogger(__name__)


def load_part(
    directory: str | Path,
    spec: PartSpec | str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    pack: bool = True,
) -> LlamaPart:
    """Load part ``spec`` (e.g. ``"8-16"``) of the sepweight model in ``directory``.

    Only the part's files are read (memory-mapped); the module is built on ``meta`` and the
    tensors are assigned. ``dtype`` None keeps the stored dtype. With ``pack`` (the default)
    the weights are then repacked for speed (:meth:`LlamaPart.pack`: one copy, made layer by
    layer, after which each layer's file is unmapped); ``pack=False`` keeps every weight a view
    of the memory-mapped files (no copy at all; the kernel may drop and re-read those pages
    under memory pressure), at the cost of slower decoding on a CPU.
    """
    weights = load(directory, spec, device=device, dtype=dtype)
    if weights.manifest.arch != "llama":
        raise LlamaModelError(f"{directory} holds a {weights.manifest.arch!r} model, not 'llama'")
    config = LlamaConfig.from_hf(weights.manifest.config)
    log.debug(
        "loading part %s of %s (%d layers)", weights.spec, directory, config.num_hidden_layers
    )
    part = part_from_state_dict(config, weights.spec, weights.state_dict(), device=device)
    del weights  # the part's parameters are now the only references to the mapped files
    return part.pack() if pack else part


def part_from_state_dict(
    config: LlamaConfig,
    spec: PartSpec | str,
    state: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
) -> LlamaPart:
    """A part whose parameters *are* the given tensors (part-relative keys, layers from slot 0)."""
    dtype = next(iter(state.values())).dtype if state else None
    with torch.device("meta"):
        part = LlamaPart(config, spec, dtype=dtype)
    _check_keys(part, state)
    part.load_state_dict(state, assign=True)
    part.tie_weights()
    if device is None:
        device = part.device if len(state) else "cpu"
    part.inv_freq = rope.inv_freq(config).to(device)
    return part.requires_grad_(False).eval()


def _check_keys(part: LlamaPart, state: Mapping[str, torch.Tensor]) -> None:
    expected = part.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LlamaModelError(
            f"weights do not fit part {part.spec}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LlamaModelError(
                f"weight {key!r} has shape {tuple(tensor.shape)}, the config "
                f"wants {tuple(expected[key].shape)}"
            )
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:
        raise LlamaModelError(
            f"weights of one part must share a dtype, got {sorted(map(str, dtypes))}"
        )
