"""The one small interface through which sessions, chain checks and failover talk to parts.

A :class:`PartLink` is one part of a chain as seen from the driver, whatever carries the calls:
a socket_rpc connection to a node (:mod:`llm_partial_run.node`), a torch.distributed rank
(:mod:`llm_partial_run.dist`), or a part in this very process (:mod:`llm_partial_run.local`).
Everything above it -- :class:`~llm_partial_run.session.Session`, the sampler, the CLI, the
HTTP API -- is written against this interface only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

PROTOCOL_VERSION = 1
"""Version of the node protocol (the calls below and their meaning)."""


@dataclass(frozen=True)
class PartInfo:
    """What a part tells the driver about itself (``info()``).

    ``spec`` is the resolved part spec text (``"b 0-15"``); ``dtype`` and ``device`` are their
    torch names (``"float32"``, ``"cuda:0"``); ``model`` is a short name of the model (the
    sepweight directory's name, for people and the HTTP API's model list); ``fingerprint``
    identifies the weights (a digest of the manifest's weight-file hashes, the same in every
    copy of the directory) and is what refuses a chain mixing models; "" when unknown.
    """

    arch: str
    spec: str
    num_layers: int
    dtype: str
    device: str
    protocol: int = PROTOCOL_VERSION
    model: str = ""
    resident_layers: int | None = None
    fingerprint: str = ""

    def to_dict(self) -> dict:
        """A plain dict (for a wire format that carries only plain values)."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> PartInfo:
        """The inverse of :meth:`to_dict`; unknown keys are ignored (a newer node)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


@runtime_checkable
class PartLink(Protocol):
    """One part of a chain, reached through some transport.

    Every method raises :class:`~llm_partial_run.errors.NodeError` naming :attr:`name` when the
    part cannot be reached or does not answer within the link's timeout, and
    :class:`~llm_partial_run.errors.SessionError` when the part refuses the call.
    """

    name: str
    """How errors name this part: ``"127.0.0.1:5001"``, ``"rank 2"``, ``"local b 0-8"``."""

    def info(self) -> PartInfo:
        """The part's architecture, spec, layer count, dtype and device."""
        ...

    def open_session(self, session_id: str, batch_size: int, max_len: int) -> None:
        """Make a KV cache of ``batch_size`` rows and ``max_len`` positions for the session;
        refused (SessionError) when it would exceed the part's session or cache-byte caps."""
        ...

    def forward(
        self, session_id: str, step: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]:
        """Run step number ``step`` (0, 1, 2, ... per session) of the session on ``x`` (token ids
        for a part with begin, hidden states otherwise) and the ``[B, T]`` padding mask.

        Returns the part's output and the seconds the part spent computing it. A repeated step
        (the same number as the last one done) returns the same output again without touching
        the cache; a step out of order is refused.
        """
        ...

    def close_session(self, session_id: str) -> None:
        """Free the session's cache (unknown sessions are ignored: closing is idempotent)."""
        ...

    def keep_rows(self, session_id: str, rows: list[int]) -> None:
        """Keep only these rows of the session's batch, in this order (rows leave a batch)."""
        ...

    def join(self, session_id: str, other_session_id: str) -> None:
        """Append the rows of session ``other_session_id`` (then closed) to ``session_id``'s
        batch (rows join a running batch); both sessions must be on this part."""
        ...

    def close(self) -> None:
        """Release the link (connections); the part itself keeps running."""
        ...
