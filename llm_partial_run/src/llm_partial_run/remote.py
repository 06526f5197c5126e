"""A part on a node, reached over socket_rpc: the client side of the node protocol.

Every failure to get an answer -- cannot connect, the token refused, the node died mid-call, no
reply within the timeout -- is a :class:`NodeError` naming ``host:port``, raised within the
timeout (never a hang). A node that answers with a refusal (unknown session, a cap, a step out
of order, a bad input) raises :class:`SessionError` naming ``host:port``, with the node's message.
"""

from __future__ import annotations

import ssl
from typing import Any

import torch

from socket_rpc import (
    AuthenticationError,
    Client,
    ProtocolError,
    RemoteError,
    RPCConnectionError,
    RPCTimeoutError,
    SocketRPCError,
)

from .errors import NodeError, PartialRunError, SessionError
from .transport import PartInfo


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` (or ``"[::1]:port"``, or a tuple) -> ``(host, port)``."""
    if isinstance(address, tuple):
        host, port = address
        return str(host), int(port)
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PartialRunError(f"a node address is 'host:port', got {address!r}")
    return host.strip("[]"), int(port)


class RemoteLink:
    """A :class:`~llm_partial_run.transport.PartLink` to a node served by :mod:`.node`.

    Args:
        address: ``"host:port"`` or ``(host, port)``.
        token: the node's shared token, if it requires one.
        timeout: seconds each call may take (connecting included) before NodeError.
        ssl_context: a client-side ``ssl.SSLContext`` when the node serves TLS.
        connect: connect now, so a wrong address or token fails here.
    """

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        token: str | bytes | None = None,
        timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        connect: bool = True,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.name = f"{self.host}:{self.port}"
        self.timeout = timeout
        self._info: PartInfo | None = None
        try:
            self._client = Client(
                self.host, self.port, token=token, ssl_context=ssl_context,
                connect_timeout=timeout, timeout=timeout, connect=connect,
            )  # fmt: skip
        except AuthenticationError as exc:
            raise NodeError(self.name, f"refused the connection: {exc}") from None
        except (SocketRPCError, OSError) as exc:
            raise NodeError(self.name, f"cannot connect: {exc}") from None

    def __repr__(self) -> str:
        return f"RemoteLink({self.name!r})"

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return self._client.call(name, *args)
        except RemoteError as exc:
            kind = exc.type_name.rsplit(".", 1)[-1]
            if kind == "SessionError":  # the node's own words, named as this client knows it
                raise SessionError(f"node {self.name}: {exc.remote_message}") from None
            message = f"node {self.name} refused {name}: {kind}: {exc.remote_message}"
            raise SessionError(message) from None
        except RPCTimeoutError:
            raise NodeError(self.name, f"no answer to {name} within {self.timeout} s") from None
        except AuthenticationError as exc:
            raise NodeError(self.name, f"refused the connection: {exc}") from None
        except (RPCConnectionError, ProtocolError, OSError) as exc:
            raise NodeError(self.name, f"{name} failed: {exc}") from None
        except SocketRPCError as exc:
            raise NodeError(self.name, f"{name} failed: {exc}") from None

    # ---- PartLink -------------------------------------------------------------------------

    def info(self) -> PartInfo:
        """The node's part: architecture, spec, layer count, dtype, device, protocol."""
        if self._info is None:
            self._info = PartInfo.from_dict(self._call("info"))
        return self._info

    def open_session(self, session_id: str, batch_size: int, max_len: int) -> None:
        """Open a session (a KV cache) on the node."""
        self._call("open_session", session_id, batch_size, max_len)

    def forward(
        self, session_id: str, step: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]:
        """Run one step on the node; returns its output and the node's compute seconds."""
        out, compute = self._call("forward", session_id, step, x, mask)
        return out, float(compute)

    def close_session(self, session_id: str) -> None:
        """Free the session on the node."""
        self._call("close_session", session_id)

    def keep_rows(self, session_id: str, rows: list[int]) -> None:
        """Keep only these rows of the session's batch on the node."""
        self._call("keep_rows", session_id, list(rows))

    def join(self, session_id: str, other_session_id: str) -> None:
        """Append the rows of another session on the node to this one."""
        self._call("join", session_id, other_session_id)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files the node holds (name -> bytes); {} when it has none."""
        return dict(self._call("tokenizer_files"))

    def close(self) -> None:
        """Close the connections (the node keeps running)."""
        self._client.close()
