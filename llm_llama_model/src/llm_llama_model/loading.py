"""Build a part on the meta device and assign memory-mapped weights from a sepweight directory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from llm_sepweight import PartSpec, load, read_manifest

from .config import LlamaConfig
from .errors import LlamaModelError
from .model import LlamaPart

log = logging.getLogger(__name__)


def load_part(
    directory: str | Path,
    spec: PartSpec | str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    pack: bool = True,
    layers: bool = True,
) -> LlamaPart:
    """Load part ``spec`` (e.g. ``"8-16"``) of the sepweight model in ``directory``.

    Only the part's files are read (memory-mapped); the module is built on ``meta`` and the
    tensors are assigned. ``dtype`` None keeps the stored dtype. With ``pack`` (the default)
    the weights are then packed for speed (``LlamaPart.pack``: one copy, after which each
    layer's file is unmapped); ``pack=False`` keeps every weight a view of the memory-mapped
    files. With ``layers=False`` only begin and end are read and every layer slot stays
    weightless until ``part.set_layer_weights(i, tensors)`` (layer streaming).
    """
    manifest = read_manifest(directory)
    if manifest.arch != "llama":
        raise LlamaModelError(f"{directory} holds a {manifest.arch!r} model, not 'llama'")
    config = LlamaConfig.from_hf(manifest.config)
    spec = PartSpec.parse(spec).resolve(config.num_hidden_layers)
    log.debug("loading part %s of %s (%d layers)", spec, directory, config.num_hidden_layers)
    state = _read(directory, spec, layers, device, dtype)
    part = LlamaPart.assigned(config, spec, state, device=device, dtype=dtype, layers=layers)
    del state  # the part's parameters are now the only references to the mapped files
    return part.pack() if pack else part


def part_from_state_dict(
    config: LlamaConfig,
    spec: PartSpec | str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LlamaPart:
    """A part whose parameters *are* the given tensors (part-relative keys, layers from slot 0);
    ``device`` / ``dtype`` convert the floating-point tensors that differ (a copy of those)."""
    return LlamaPart.assigned(config, spec, state_dict, device=device, dtype=dtype)


def _read(directory, spec: PartSpec, layers: bool, device, dtype) -> dict[str, torch.Tensor]:
    """The part's tensors (memory-mapped), without any layer's when ``layers`` is False."""
    if not layers:
        if not (spec.begin or spec.end):
            return {}
        spec = PartSpec(begin=spec.begin, end=spec.end)
    return load(directory, spec, device=device, dtype=dtype).state_dict()
