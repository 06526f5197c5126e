"""Deciders: where each checkpoint key goes in a sepweight directory.

A decider maps a source key to a placement: ``("begin", key)``, ``("mid", layer, key)``,
``("end", key)``, a list of placements (the tensor is stored in each place, e.g. tied embeddings
both in begin and end), or ``None`` to skip the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from .errors import ConversionError

Placement = tuple[str, str] | tuple[str, int, str]
Decider = Callable[[str], Placement | list[Placement] | None]


def file_of(placement: Placement) -> str:
    """The file a placement lands in: ``begin.safetensors``, ``mid.00003.safetensors``, ..."""
    from .manifest import BEGIN, END, mid_name

    kind = placement[0]
    if kind == "begin" and len(placement) == 2:
        return BEGIN
    if kind == "end" and len(placement) == 2:
        return END
    if kind == "mid" and len(placement) == 3 and isinstance(placement[1], int):
        if placement[1] < 0:
            raise ConversionError(f"negative layer index in placement {placement!r}")
        return mid_name(placement[1])
    raise ConversionError(
        f"bad placement {placement!r}: expected ('begin', key), ('mid', layer, key) or ('end', key)"
    )


def placements(decider: Decider, key: str) -> list[Placement]:
    """Everything ``decider`` says about ``key``, as a list (empty when the key is skipped)."""
    decided = decider(key)
    if decided is None:
        return []
    if isinstance(decided, list):
        return decided
    return [decided]


def prefix_decider(
    layer_pattern: str, begin: Iterable[str], *, skip: Iterable[str] = ()
) -> Decider:
    """A decider for checkpoints whose layer keys share a numbered prefix.

    ``layer_pattern`` is a regular expression whose first group is the layer index and which
    matches the prefix to strip, e.g. ``r"model\\.layers\\.(\\d+)\\."``. Keys starting with one of
    ``begin`` go to begin (with that prefix stripped), keys starting with one of ``skip`` are
    dropped, every other key goes to end with nothing stripped.
    """
    pattern = re.compile(layer_pattern)
    begin, skip = tuple(begin), tuple(skip)

    def decide(key: str) -> Placement | None:
        if skip and key.startswith(skip):
            return None
        if match := pattern.match(key):
            return ("mid", int(match.group(1)), key[match.end() :])
        for prefix in begin:
            if key.startswith(prefix):
                return ("begin", key[len(prefix) :])
        return ("end", key)

    return decide


def gguf_decider() -> Decider:
    """The architecture-independent decider for llama.cpp's GGUF tensor names.

    ``blk.N.*`` is layer N, ``token_embd.*`` (and position embeddings) is begin, everything else
    (``output_norm``, ``output``, ...) is end. Names are kept as GGUF spells them; a model package
    that wants Hugging Face names registers its own renaming.
    """
    layer = re.compile(r"blk\.(\d+)\.")

    def decide(key: str) -> Placement:
        if match := layer.match(key):
            return ("mid", int(match.group(1)), key[match.end() :])
        if key.startswith(("token_embd.", "position_embd.", "token_types.")):
            return ("begin", key)
        return ("end", key)

    return decide
