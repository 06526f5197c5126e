"""Falcon checkpoints <-> sepweight: the decider for Hugging Face names, loading a part, and the
:class:`~llm_sepweight.Architecture` registered under the ``llm_microlibs.models`` entry points.

Hugging Face key                              sepweight place
``transformer.word_embeddings.weight``        begin ``word_embeddings.weight`` (and, when the
                                              embeddings are tied, end ``lm_head.weight`` too)
``transformer.h.N.<rest>``                    layer N ``<rest>``
``transformer.ln_f.{weight,bias}``            end ``ln_f.{weight,bias}``
``lm_head.weight``                            end ``lm_head.weight`` (skipped when tied)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from llm_sepweight import Architecture, Decider, PartSpec, Placement, load

from .config import MODEL_TYPES, FalconConfig
from .errors import FalconModelError
from .model import FalconPart

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:transformer\.)?h\.(\d+)\.")
# Buffers some older checkpoints saved; the model recomputes them.
_SKIPPED_SUFFIXES = (".inv_freq",)


def decider(hf_config: Mapping[str, Any]) -> Decider:
    """The decider for Hugging Face Falcon key names (``transformer.h.N.*`` ...).

    The config is validated first (an unsupported Falcon is refused before any file is written);
    ``tie_word_embeddings`` decides whether the embedding also becomes the end's ``lm_head``.
    """
    tied = FalconConfig.from_hf(hf_config).tie_word_embeddings

    def decide(key: str) -> Placement | list[Placement] | None:
        if key.endswith(_SKIPPED_SUFFIXES):
            return None
        if match := _LAYER.match(key):
            return ("mid", int(match.group(1)), key[match.end() :])
        name = key.removeprefix("transformer.")
        if name == "word_embeddings.weight":
            begin = ("begin", name)
            return [begin, ("end", "lm_head.weight")] if tied else begin
        if name in ("ln_f.weight", "ln_f.bias"):
            return ("end", name)
        if key == "lm_head.weight":
            return None if tied else ("end", key)
        raise FalconModelError(f"unexpected key {key!r} in a Falcon checkpoint")

    return decide


def load_part(
    directory: str | os.PathLike[str],
    spec: str | PartSpec = "f",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FalconPart:
    """Build the part ``spec`` of the sepweight directory: on the meta device, then its files
    memory-mapped and assigned (``load_state_dict(assign=True)``); nothing else is read.
    """
    weights = load(directory, spec, device=device, dtype=dtype)
    if weights.manifest.arch != "falcon":
        raise FalconModelError(f"{directory} holds a {weights.manifest.arch!r} model, not 'falcon'")
    config = FalconConfig.from_hf(weights.manifest.config)
    state = weights.state_dict(layer_prefix="layers.", first_slot=0)
    log.debug("loading Falcon part %s from %s", weights.spec, directory)
    return part_from_state_dict(config, weights.spec, state)


def part_from_state_dict(
    config: FalconConfig, spec: str | PartSpec, state: Mapping[str, torch.Tensor]
) -> FalconPart:
    """A part whose parameters *are* the given tensors (no copy).

    Keys are part-relative: ``word_embeddings.weight``, ``layers.<slot>.*`` from slot 0,
    ``ln_f.*``, ``lm_head.weight``; every key the part needs must be there, and no other. With
    tied embeddings a part holding begin and end uses the embedding as its head.
    """
    part = FalconPart(config, spec, device="meta")
    try:
        missing, unexpected = part.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise FalconModelError(f"weights do not fit part {part.spec}: {exc}") from exc
    if missing or unexpected:
        raise FalconModelError(
            f"weights do not match part {part.spec}: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    if config.tie_word_embeddings and part.spec.begin and part.spec.end:
        part.lm_head.weight = part.word_embeddings.weight  # one copy in memory, as trained
    return part.requires_grad_(False).eval()


ARCHITECTURE = Architecture(
    name="falcon",
    model_types=MODEL_TYPES,
    decider=decider,
    load_part=load_part,
)
