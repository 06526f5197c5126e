"""The errors llm_partial_run raises; each names what was wrong and what to do."""

from __future__ import annotations


class PartialRunError(Exception):
    """Base class of every llm_partial_run error."""


class ChainError(PartialRunError):
    """The parts given do not form one model: a gap, an overlap, a missing begin or end, or
    parts of different models. Raised before any tensor is sent."""


class NodeError(PartialRunError):
    """A part could not answer: its node died, hung past the timeout, or refused the call.

    ``node`` is the part's name as the transport knows it (``"127.0.0.1:5001"``, ``"rank 2"``).
    """

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node = node
        self.reason = reason


class SessionError(PartialRunError):
    """A session call was refused: unknown or expired session, a step out of order, a cap on
    sessions or cache bytes reached."""
