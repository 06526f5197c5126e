"""Falcon checkpoints <-> sepweight: the decider for Hugging Face names and the
:class:`~llm_sepweight.Architecture` registered under the ``llm_microlibs.models`` entry points.

Hugging Face key                              sepweight place
``transformer.word_embeddings.weight``        begin ``word_embeddings.weight`` (and, when the
                                              embeddings are tied, end ``lm_head.weight`` too)
``transformer.h.N.<rest>``                    layer N ``<rest>``
``transformer.ln_f.{weight,bias}``            end ``ln_f.{weight,bias}``
``lm_head.weight``                            end ``lm_head.weight`` (skipped when tied)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from llm_sepweight import Architecture, Decider, Placement

from .config import MODEL_TYPES, FalconConfig
from .errors import FalconModelError
from .loading import load_part

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


ARCHITECTURE = Architecture(
    name="falcon",
    model_types=MODEL_TYPES,
    decider=decider,
    load_part=load_part,
)
