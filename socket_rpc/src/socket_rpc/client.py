"""The client: ``call(name, *args, **kwargs)``, a proxy, persistent connections, timeouts."""

from __future__ import annotations

import itertools
import socket
import ssl
import threading
import time
from types import TracebackType
from typing import Any

from .auth import client_handshake, token_bytes
from .codec import Decoder, Encoder, json_string
from .errors import (
    ProtocolError,
    RemoteError,
    RPCConnectionError,
    RPCTimeoutError,
    SocketRPCError,
    UnknownFunctionError,
)
from .limits import Limits
from .wire import DEFAULT_SPIN, Channel, Frame, check_spin, pack_text, to_json

__all__ = ["Client", "RemoteFunction"]


class RemoteFunction:
    """A remote function bound to a client: ``client.forward(x)`` calls ``"forward"``."""

    __slots__ = ("_client", "name")

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        client = self._client
        return client._call(self.name, args, kwargs, client.timeout)  # as client.call does

    def __repr__(self) -> str:
        return f"<remote function {self.name!r} on {self._client!r}>"


class Client:
    """Calls the functions a :class:`~socket_rpc.Server` exposes.

    Connections persist across calls. The client is safe to share between threads: each call
    takes an idle connection (or opens one), so calls from different threads run at the same time
    on the server. A connection that the server closed (it restarted, say) is noticed before it is
    reused and replaced, so a restarted server is reconnected to transparently. A call is never
    retried once its request has been sent.

    Args:
        host: the server's address.
        port: the server's port.
        token: the shared secret, if the server requires one. A client with a token also
            requires the server to prove it holds it.
        ssl_context: a client-side ``ssl.SSLContext``, e.g.
            ``ssl.create_default_context(cafile="server.pem")``.
        server_hostname: the name to check the server certificate against (default: ``host``).
        connect_timeout: seconds to connect, complete TLS and authenticate.
        timeout: default seconds for each call (sending the request and receiving the reply);
            ``None`` waits as long as the server takes. Use :meth:`call_with_timeout` per call.
        limits: the size limits applied to every reply.
        max_idle_connections: idle connections kept for reuse; extras are closed.
        connect: open the first connection now, so a wrong address or token fails here.
        spin: seconds to busy-wait for a reply before blocking (default 200e-6; 0: never). A
            fast reply is then read without the calling thread sleeping and being woken, which
            saves tens of microseconds per small call; it costs up to ``spin`` of one core's
            time per call. Never extends a timeout; ignored for TLS connections.

    Raises:
        RPCConnectionError: the server cannot be reached (only with ``connect=True``).
        AuthenticationError: the tokens do not match.
        TypeError, ValueError: ``spin`` is not a finite number of seconds >= 0.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        timeout: float | None = None,
        limits: Limits | None = None,
        max_idle_connections: int = 8,
        connect: bool = True,
        spin: float = DEFAULT_SPIN,
    ) -> None:
        self.spin = check_spin(spin)
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._token = token_bytes(token)
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname or host
        self._limits = limits or Limits()
        self._max_idle = max_idle_connections
        self._lock = threading.Lock()
        self._idle: list[Channel] = []
        self._ids = itertools.count(1)
        self._closed = False
        if connect:
            self._release(self._connect())

    def __repr__(self) -> str:
        return f"Client({self.host!r}, {self.port})"

    # ---- calling --------------------------------------------------------------------------

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the remote function ``name`` with these arguments and return its result.

        Raises:
            RemoteError: the remote function raised (type name, message, traceback attached).
            UnknownFunctionError: the server exposes no function ``name``.
            EncodeError: an argument cannot be sent (nothing was sent).
            RPCTimeoutError: no reply within the client's ``timeout``.
            RPCConnectionError: the connection failed or the server went away during the call.
            ProtocolError: the reply was malformed.
        """
        return self._call(name, args, kwargs, self.timeout)

    def call_with_timeout(
        self, timeout: float | None, name: str, /, *args: Any, **kwargs: Any
    ) -> Any:
        """:meth:`call` with its own ``timeout`` in seconds (``None``: wait forever)."""
        return self._call(name, args, kwargs, timeout)

    def __getattr__(self, name: str) -> RemoteFunction:
        if name.startswith("_"):
            raise AttributeError(name)
        return RemoteFunction(self, name)

    def _call(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> Any:
        encoder = Encoder(self._limits.max_depth)
        call_id = next(self._ids)
        # The header {"kind": "call", "id", "function", "args", ["kwargs"]} written as JSON text
        # directly (the same bytes as pack() of the dict of encoded trees would write).
        function = json_string(name) if type(name) is str else to_json(name)
        if len(args) == 1:
            written = encoder.write(args[0])
        else:
            written = ",".join([encoder.write(a) for a in args])
        start = f'{{"kind":"call","id":{call_id},"function":{function},"args":[{written}]'
        if kwargs:
            start += ',"kwargs":' + encoder.write(kwargs)
        message = pack_text(start, encoder.buffers, encoder.owners)
        channel = self._acquire()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            channel.send(message, deadline)
            frame = channel.receive(deadline)
            if frame is None:
                raise RPCConnectionError(
                    f"{self.host}:{self.port} closed the connection during call {name!r}"
                )
            result = self._result(frame, call_id, name)
            del frame
        except RemoteError:
            self._release(channel)
            raise
        except RPCTimeoutError:
            channel.close()
            raise RPCTimeoutError(
                f"call {name!r} to {self.host}:{self.port} got no reply within {timeout} s"
            ) from None
        except OSError as exc:
            channel.close()
            raise RPCConnectionError(
                f"call {name!r} to {self.host}:{self.port} failed, the connection broke: {exc}"
            ) from None
        except BaseException:
            channel.close()  # the connection's state is unknown: never reuse it
            raise
        self._release(channel)
        return result

    def _result(self, frame: Frame, call_id: int, name: str) -> Any:
        header = frame.header
        kind = header.get("kind")
        if kind == "error" and header.get("id") is None:
            raise ProtocolError(f"the server refused the call {name!r}: {header.get('message')}")
        if header.get("id") != call_id:
            raise ProtocolError(f"reply for call {header.get('id')!r}, expected {call_id}")
        if kind == "result":
            return Decoder(frame.buffers, self._limits).decode(header.get("value"))
        if kind == "error":
            type_name = str(header.get("type"))
            error = UnknownFunctionError if type_name == "UnknownFunctionError" else RemoteError
            raise error(type_name, str(header.get("message")), str(header.get("traceback") or ""))
        raise ProtocolError(f"unexpected reply kind {kind!r}")

    # ---- connections ----------------------------------------------------------------------

    def _connect(self) -> Channel:
        where = f"{self.host}:{self.port}"
        deadline = time.monotonic() + self.connect_timeout
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError:
            raise RPCTimeoutError(
                f"connecting to {where} timed out after {self.connect_timeout} s"
            ) from None
        except OSError as exc:
            raise RPCConnectionError(f"cannot connect to {where}: {exc}") from None
        channel = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = raw
            if self._ssl_context is not None:
                sock = self._ssl_context.wrap_socket(raw, server_hostname=self._server_hostname)
            channel = Channel(sock, self._limits, self.spin)
            client_handshake(channel, self._token, deadline)
        except BaseException as exc:
            (channel.close() if channel is not None else raw.close())
            if isinstance(exc, SocketRPCError) or not isinstance(exc, OSError):
                raise
            if isinstance(exc, TimeoutError):
                raise RPCTimeoutError(f"the handshake with {where} timed out") from None
            raise RPCConnectionError(f"the handshake with {where} failed: {exc}") from None
        return channel

    def _acquire(self) -> Channel:
        with self._lock:
            if self._closed:
                raise RPCConnectionError("the client is closed")
            while self._idle:
                channel = self._idle.pop()
                if channel.is_idle_and_open():
                    return channel
                channel.close()
        return self._connect()

    def _release(self, channel: Channel) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(channel)
                return
        channel.close()

    def close(self) -> None:
        """Close the idle connections; connections in use close when their call ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for channel in idle:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
