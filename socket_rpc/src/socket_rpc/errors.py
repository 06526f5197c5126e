"""The exceptions of socket_rpc.

Every error this library raises is a :class:`SocketRPCError`. The subclasses say what went wrong:
the peer broke the protocol, the token did not match, the remote function raised, a call ran out of
time, the connection was lost, or a value cannot be sent.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "RPCConnectionError",
    "EncodeError",
    "ProtocolError",
    "RemoteError",
    "RPCTimeoutError",
    "SocketRPCError",
    "UnknownFunctionError",
]


class SocketRPCError(Exception):
    """Base class of every error raised by socket_rpc."""


class ProtocolError(SocketRPCError):
    """A message broke the wire format (bad magic, lying lengths, malformed header, over a limit).

    The connection that carried it is closed; the server keeps serving everyone else.
    """


class AuthenticationError(SocketRPCError):
    """The shared-token challenge failed: the token is wrong or missing on one side."""


class EncodeError(SocketRPCError, TypeError):
    """A value cannot be sent: its type is not one socket_rpc encodes (nothing is ever pickled)."""


class RPCConnectionError(SocketRPCError, ConnectionError):
    """Connecting failed, or the connection broke while a call was in flight (the server died)."""


class RPCTimeoutError(SocketRPCError, TimeoutError):
    """Connecting or waiting for a reply took longer than the configured timeout."""


class RemoteError(SocketRPCError):
    """The remote function raised; this carries the remote type name, message and traceback.

    Attributes:
        type_name: the qualified name of the remote exception type, e.g. ``"ValueError"``.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: the remote traceback as text (empty if the server does not send it).
    """

    def __init__(self, type_name: str, remote_message: str, remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        super().__init__(type_name, remote_message, remote_traceback)

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class UnknownFunctionError(RemoteError):
    """The server exposes no function of the requested name."""
