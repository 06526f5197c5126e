"""How model packages plug into conversion: the ``llm_microlibs.models`` entry-point group.

A model package registers an :class:`Architecture` under the group, e.g. in its pyproject::

    [project.entry-points."llm_microlibs.models"]
    llama = "llm_llama_model.convert:ARCHITECTURE"

llm_sepweight never imports a model package by name; it asks the entry points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch

from .decider import Decider
from .errors import ConversionError

log = logging.getLogger(__name__)
GROUP = "llm_microlibs.models"


@dataclass(frozen=True)
class Architecture:
    """What a model package tells the converter about its checkpoints.

    ``decider(config)`` places Hugging Face keys. For GGUF sources, ``config_from_gguf`` turns the
    GGUF metadata into a Hugging Face style config (besides the GGUF keys it receives
    ``sepweight.tensor_names`` and, when the file has a vocabulary, ``sepweight.vocab_size``),
    ``gguf_rename`` maps llama.cpp tensor names to
    Hugging Face names (None skips one) and ``gguf_transform(hf_name, tensor, config)`` undoes
    llama.cpp's layout changes. ``load_part(directory, spec, device=, dtype=)`` builds a slice.

    A hook that is handed a checkpoint it cannot convert (a config of another family, a key it
    does not know) raises ``ValueError`` or a subclass (``LlamaModelError``, ``FalconModelError``);
    ``convert`` reports it as a :class:`ConversionError` naming the package. Any other exception
    from a hook is a bug in the package and is left alone.
    """

    name: str
    model_types: tuple[str, ...]
    decider: Callable[[Mapping[str, Any]], Decider]
    gguf_architectures: tuple[str, ...] = ()
    config_from_gguf: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    gguf_rename: Callable[[str], str | None] | None = None
    gguf_transform: Callable[[str, torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None
    load_part: Callable[..., torch.nn.Module] | None = None


def architectures() -> list[Architecture]:
    """Every Architecture registered by an installed package."""
    found = []
    for ep in entry_points(group=GROUP):
        try:
            arch = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others
            log.warning("cannot load model plugin %s (%s): %s", ep.name, ep.value, exc)
            continue
        if isinstance(arch, Architecture):
            found.append(arch)
        else:
            log.warning("entry point %s is a %s, not an Architecture", ep.value, type(arch))
    return found


def find_architecture(
    *, name: str | None = None, model_type: str | None = None, gguf: str | None = None
) -> Architecture:
    """The registered Architecture with this name, Hugging Face model_type or GGUF architecture."""
    registered = architectures()
    for arch in registered:
        if (
            (name is not None and arch.name == name)
            or (model_type is not None and model_type in arch.model_types)
            or (gguf is not None and gguf in arch.gguf_architectures)
        ):
            return arch
    wanted = name or model_type or gguf
    known = ", ".join(sorted(a.name for a in registered)) or "none"
    raise ConversionError(
        f"no installed model package handles {wanted!r} (installed: {known}); install the one "
        "for it (e.g. llm_llama_model for Llama-family models)"
    )
