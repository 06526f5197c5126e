"""socket_rpc: a small, fast and safe RPC over TCP for numpy arrays and torch tensors.

Nothing is ever pickled: values travel as a JSON header plus raw little-endian array bytes.
Standard library only at import time; numpy and torch are imported when such a value arrives.

    from socket_rpc import Client, Server

    server = Server()                      # binds 127.0.0.1, a free port

    @server.expose
    def add(a, b):
        return a + b

    with server, Client(*server.address) as client:
        assert client.add(2, 3) == 5
"""

from .client import Client, RemoteFunction
from .errors import (
    AuthenticationError,
    EncodeError,
    ProtocolError,
    RemoteError,
    RPCConnectionError,
    RPCTimeoutError,
    SocketRPCError,
    UnknownFunctionError,
)
from .limits import Limits
from .server import Server, exposed
from .wire import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "AuthenticationError",
    "Client",
    "EncodeError",
    "Limits",
    "ProtocolError",
    "RPCConnectionError",
    "RPCTimeoutError",
    "RemoteError",
    "RemoteFunction",
    "Server",
    "SocketRPCError",
    "UnknownFunctionError",
    "exposed",
]
