"""Size limits that every received message is checked against before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]

_MiB = 1 << 20
_GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer may send; a message over any of them is a ``ProtocolError``.

    The prefix of every message states its header and body lengths, and both are compared with
    these limits before a single byte of header or body is allocated, so a peer that claims a
    1 TiB body is refused at once.

    Attributes:
        max_header_bytes: largest JSON header accepted.
        max_body_bytes: largest raw body (all array and bytes buffers together) accepted.
        max_buffers: most raw buffers (arrays plus bytes values) in one message.
        max_depth: deepest nesting of lists, tuples and dicts in one value.
        max_ndim: most dimensions of one array.
    """

    max_header_bytes: int = 16 * _MiB
    max_body_bytes: int = 4 * _GiB
    max_buffers: int = 65536
    max_depth: int = 64
    max_ndim: int = 64

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_body_bytes", "max_buffers", "max_depth", "max_ndim"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {value!r}")
        if self.max_header_bytes >= 1 << 32:
            raise ValueError("Limits.max_header_bytes must be below 4 GiB (a 32-bit field)")


# The only messages allowed before a peer has authenticated: tiny headers, no body.
HANDSHAKE_LIMITS = Limits(max_header_bytes=4096, max_body_bytes=0, max_buffers=0, max_depth=4)
