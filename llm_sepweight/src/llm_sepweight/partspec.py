"""Part specs: which piece of a model a node holds, in a strict text form.

Tokens, separated by spaces: ``f`` (the full model), ``b`` (begin: embeddings), ``e`` (end: final
norm and head) and ``a-b`` (layers a..b-1, half-open). Examples: ``"b 0-8"``, ``"8-16"``,
``"16-30 e"``, ``"e"``, ``"f"``. Tokens come in that order (``b``, one range, ``e``), each at most
once; anything else is an error that quotes the offending token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PartSpecError

_RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclass(frozen=True)
class PartSpec:
    """A piece of a model: begin and/or a half-open range of layers and/or end, or the full model.

    ``full`` is the unresolved ``f``; :meth:`resolve` turns it into ``b 0-N e`` once the layer
    count is known. ``layers`` is an empty ``range(0, 0)`` when the part holds no layer.
    """

    begin: bool = False
    layers: range = range(0)
    end: bool = False
    full: bool = False

    def __post_init__(self) -> None:
        if self.layers.step != 1:
            raise PartSpecError(f"layer range must have step 1, got {self.layers!r}")
        if len(self.layers) == 0 and self.layers != range(0):
            raise PartSpecError(f"empty layer range {self.layers.start}-{self.layers.stop}")
        if self.full and (self.begin or self.end or len(self.layers)):
            raise PartSpecError("'f' is the whole model and cannot be combined with other tokens")
        if not (self.full or self.begin or self.end or len(self.layers)):
            raise PartSpecError("a part spec must hold something: 'f', 'b', 'e' or a range 'a-b'")

    @classmethod
    def parse(cls, text: str | PartSpec) -> PartSpec:
        """Parse the text form, e.g. ``"b 0-8"``; a ``PartSpec`` is returned as it is."""
        if isinstance(text, PartSpec):
            return text
        if not isinstance(text, str):
            raise PartSpecError(f"a part spec is a string like 'b 0-8', got {type(text).__name__}")
        tokens = text.split()
        if not tokens:
            raise PartSpecError("empty part spec: use 'f', 'b', 'e' or a range like '0-8'")
        if tokens == ["f"]:
            return cls(full=True)
        begin = end = False
        layers = range(0)
        stage = 0  # 0: expecting b/range/e, 1: after b, 2: after range, 3: after e
        for token in tokens:
            if token == "f":
                raise PartSpecError(f"'f' must stand alone in a part spec, got {text!r}")
            if token == "b" and stage == 0:
                begin, stage = True, 1
            elif token == "e" and stage < 3:
                end, stage = True, 3
            elif (match := _RANGE.match(token)) and stage < 2:
                start, stop = int(match.group(1)), int(match.group(2))
                if stop <= start:
                    raise PartSpecError(
                        f"layer range {token!r} in {text!r} is empty: write 'a-b' with a < b "
                        "(half-open, layers a..b-1)"
                    )
                layers, stage = range(start, stop), 2
            elif token in ("b", "e") or _RANGE.match(token):
                raise PartSpecError(
                    f"token {token!r} repeated or out of order in {text!r}: "
                    "write 'b', then one range 'a-b', then 'e'"
                )
            else:
                raise PartSpecError(
                    f"bad token {token!r} in part spec {text!r}: expected 'f', 'b', 'e' or 'a-b'"
                )
        return cls(begin=begin, layers=layers, end=end)

    def __str__(self) -> str:
        if self.full:
            return "f"
        tokens = ["b"] if self.begin else []
        if len(self.layers):
            tokens.append(f"{self.layers.start}-{self.layers.stop}")
        if self.end:
            tokens.append("e")
        return " ".join(tokens)

    def resolve(self, num_layers: int) -> PartSpec:
        """This spec with ``f`` expanded, checked against a model of ``num_layers`` layers."""
        if num_layers < 0:
            raise PartSpecError(f"num_layers must be >= 0, got {num_layers}")
        if self.full:
            return PartSpec(begin=True, layers=range(num_layers), end=True)
        if self.layers.stop > num_layers:
            raise PartSpecError(
                f"part {str(self)!r} needs layers up to {self.layers.stop - 1}, "
                f"but the model has {num_layers} layers (0-{num_layers})"
            )
        return self

    def is_full(self, num_layers: int) -> bool:
        """True when this part holds the whole model of ``num_layers`` layers."""
        spec = self.resolve(num_layers)
        return spec.begin and spec.end and spec.layers == range(num_layers)
