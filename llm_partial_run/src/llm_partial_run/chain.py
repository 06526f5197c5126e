"""The chain check: do these parts form one model, each layer once, begin first and end last?

Run on the parts' ``info()`` before any tensor is sent. The same part spec listed twice makes the
second a spare of the first (failover); a spare given apart must match a part of the chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llm_sepweight import PartSpec, PartSpecError

from .errors import ChainError
from .transport import PROTOCOL_VERSION, PartInfo, PartLink


@dataclass
class Chain:
    """The checked chain: ``links`` in order (begin first, end last), ``infos`` alike, and
    ``spares[i]``: the links that can take over from ``links[i]``."""

    links: list[PartLink]
    infos: list[PartInfo]
    spares: dict[int, list[PartLink]] = field(default_factory=dict)


def check_chain(
    nodes: Sequence[tuple[PartLink, PartInfo]],
    spares: Sequence[tuple[PartLink, PartInfo]] = (),
) -> Chain:
    """Order the parts into a chain, or raise :class:`ChainError` naming a node and the reason.

    Refused: no parts; a protocol version, architecture, layer count, dtype or weights
    (``fingerprint``; the directory's name may differ between copies) that differ from the
    first node's; a missing begin or end; a gap or an overlap of layers; a spare whose
    spec matches no part of the chain.
    """
    if not nodes:
        raise ChainError("no parts given: a chain needs parts covering begin, every layer, end")
    first_link, first = nodes[0]
    seen: set[int] = set()
    for link, _ in [*nodes, *spares]:
        if id(link) in seen:
            raise ChainError(f"node {link.name} is listed twice: a spare must be another node")
        seen.add(id(link))
    for link, info in [*nodes, *spares]:
        _check_same(link, info, first_link, first)
    by_spec: dict[PartSpec, list[tuple[PartLink, PartInfo]]] = {}
    for link, info in nodes:
        by_spec.setdefault(_spec(link, info), []).append((link, info))
    order = sorted(by_spec, key=lambda s: _position(s, first.num_layers))
    _check_cover([(spec, by_spec[spec][0][0]) for spec in order], first.num_layers)
    chain = Chain([by_spec[s][0][0] for s in order], [by_spec[s][0][1] for s in order])
    for i, spec in enumerate(order):
        extra = [link for link, _ in by_spec[spec][1:]]
        if extra:
            chain.spares[i] = extra
    for link, info in spares:
        spec = _spec(link, info)
        if spec not in by_spec:
            raise ChainError(
                f"spare {link.name} holds part {str(spec)!r}, which no node of the chain holds "
                f"(parts: {', '.join(repr(str(s)) for s in order)})"
            )
        chain.spares.setdefault(order.index(spec), []).append(link)
    return chain


def _check_same(link: PartLink, info: PartInfo, first_link: PartLink, first: PartInfo) -> None:
    if info.protocol != PROTOCOL_VERSION:
        raise ChainError(
            f"node {link.name} speaks node protocol {info.protocol}, this client "
            f"{PROTOCOL_VERSION}: run the same llm_partial_run version on both"
        )
    for what in ("arch", "num_layers", "dtype", "fingerprint"):
        mine, theirs = getattr(info, what), getattr(first, what)
        if what == "fingerprint" and (not mine or not theirs):
            continue  # a transport that does not know it
        if mine != theirs:
            raise ChainError(
                f"node {link.name} serves {_WHAT[what]} {mine!r}, but node {first_link.name} "
                f"serves {theirs!r}: all parts of a chain must come from one model"
            )


_WHAT = {"arch": "architecture", "num_layers": "a layer count of", "dtype": "dtype",
         "fingerprint": "weights of fingerprint"}  # fmt: skip


def _spec(link: PartLink, info: PartInfo) -> PartSpec:
    try:
        return PartSpec.parse(info.spec).resolve(info.num_layers)
    except PartSpecError as exc:
        raise ChainError(f"node {link.name} reports a bad part spec: {exc}") from None


def _position(spec: PartSpec, num_layers: int) -> tuple[int, int]:
    """Sort key: begin first, then by first layer, a part with only end last."""
    if spec.begin:
        return (-1, spec.layers.start if len(spec.layers) else 0)
    if len(spec.layers):
        return (spec.layers.start, 0)
    return (num_layers, 1)


def _check_cover(order: list[tuple[PartSpec, PartLink]], num_layers: int) -> None:
    spec, link = order[0]
    if not spec.begin:
        raise ChainError(
            f"no node holds begin (the embeddings): the first part is {str(spec)!r} on node "
            f"{link.name}; add a node whose part starts with 'b'"
        )
    cursor, previous = 0, link
    for i, (spec, link) in enumerate(order):
        if spec.begin and i > 0:
            raise ChainError(
                f"nodes {previous.name} and {link.name} both hold begin: each part of a model "
                "must be held once"
            )
        if len(spec.layers):
            start, stop = spec.layers.start, spec.layers.stop
            if start > cursor:
                raise ChainError(
                    f"gap: no node holds layers {cursor}-{start} (half-open) between node "
                    f"{previous.name} and node {link.name} ({str(spec)!r})"
                )
            if start < cursor:
                raise ChainError(
                    f"overlap: layers {start}-{min(cursor, stop)} are held by node "
                    f"{previous.name} and by node {link.name} ({str(spec)!r})"
                )
            cursor = stop
        if spec.end and i < len(order) - 1:
            later_spec, later = order[i + 1]
            raise ChainError(
                f"node {link.name} holds end ({str(spec)!r}) but node {later.name} "
                f"({str(later_spec)!r}) would come after it: overlap"
            )
        previous = link
    if cursor < num_layers:
        raise ChainError(
            f"gap: no node holds layers {cursor}-{num_layers} (half-open) of the "
            f"{num_layers}-layer model, after node {previous.name}"
        )
    if not order[-1][0].end:
        raise ChainError(
            f"no node holds end (final norm and head): the last part is {str(order[-1][0])!r} "
            f"on node {previous.name}; add a node whose part ends with 'e'"
        )
