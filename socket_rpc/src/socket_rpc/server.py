"""The server: explicitly exposed functions, a thread per connection, many calls per connection."""

from __future__ import annotations

import inspect
import logging
import selectors
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar, overload

from .auth import server_handshake, token_bytes
from .codec import Decoder, Encoder
from .errors import AuthenticationError, EncodeError, ProtocolError, SocketRPCError
from .limits import Limits
from .wire import DEFAULT_SPIN, Channel, Frame, check_spin, pack, pack_text

__all__ = ["Server", "exposed"]

logger = logging.getLogger("socket_rpc")

F = TypeVar("F", bound=Callable[..., Any])

_EXPOSED_ATTR = "__socket_rpc_exposed__"


@overload
def exposed(func: F, /) -> F: ...
@overload
def exposed(*, name: str) -> Callable[[F], F]: ...
def exposed(func: Any = None, /, *, name: str | None = None) -> Any:
    """Mark a method for :meth:`Server.expose_object`; ``name`` overrides its remote name.

    Marking does nothing by itself: only an object handed to ``expose_object`` is served, and
    only its marked methods.
    """

    def mark(f: F) -> F:
        setattr(f, _EXPOSED_ATTR, name or f.__name__)
        return f

    return mark(func) if func is not None else mark


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


class Server:
    """Serves explicitly exposed functions over TCP to :class:`~socket_rpc.Client`.

    The socket is bound and listening as soon as the server is made (``port=0`` picks a free port,
    see :attr:`address`). Call :meth:`start` to serve from a background thread or
    :meth:`serve_forever` to serve from this one; :meth:`close` (or leaving the ``with`` block)
    stops accepting, closes every connection and joins the threads.

    Args:
        host: interface to bind; ``127.0.0.1`` unless you mean to serve other machines.
        port: TCP port; 0 picks a free one.
        token: shared secret; when set, every client must prove it holds it (HMAC challenge).
        ssl_context: a server-side ``ssl.SSLContext`` to wrap every connection in TLS.
        limits: the size limits applied to every received message.
        max_connections: connections beyond this many are closed at once.
        handshake_timeout: seconds a new connection has to finish TLS and authentication.
        send_tracebacks: send remote tracebacks to clients (they are authenticated peers).
        spin: seconds each connection busy-waits for the next call after a reply before it
            blocks (default 200e-6; 0: never). A client calling in a loop is then answered
            without the connection's thread sleeping and being woken; it costs up to ``spin`` of
            one core's time per call. Ignored for TLS connections.

    Raises:
        TypeError, ValueError: ``spin`` is not a finite number of seconds >= 0.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        max_connections: int = 256,
        handshake_timeout: float = 10.0,
        send_tracebacks: bool = True,
        spin: float = DEFAULT_SPIN,
    ) -> None:
        self.spin = check_spin(spin)
        self._token = token_bytes(token)
        self._ssl_context = ssl_context
        self._limits = limits or Limits()
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self._send_tracebacks = send_tracebacks
        self._functions: dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._closing = threading.Event()
        self._loop_done = threading.Event()
        self._loop_started = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener = _listen(host, port)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]

    # ---- exposure -------------------------------------------------------------------------

    @overload
    def expose(self, func: F, /, *, name: str | None = None) -> F: ...
    @overload
    def expose(self, *, name: str | None = None) -> Callable[[F], F]: ...
    def expose(self, func: Any = None, /, *, name: str | None = None) -> Any:
        """Expose ``func`` under ``name`` (default: its ``__name__``); usable as a decorator.

        ``@server.expose``, ``@server.expose(name="add")`` and ``server.expose(obj.method)`` all
        work. Only exposed functions can ever be called.
        """

        def register(f: F) -> F:
            if not callable(f):
                raise TypeError(f"only callables can be exposed, not {type(f).__name__}")
            remote_name = name or getattr(f, "__name__", None)
            if not isinstance(remote_name, str) or not remote_name:
                raise ValueError(f"give a name to expose {f!r} under")
            with self._lock:
                if remote_name in self._functions:
                    raise ValueError(f"a function named {remote_name!r} is already exposed")
                self._functions[remote_name] = f
            return f

        return register(func) if func is not None else register

    def expose_object(self, obj: Any, *, prefix: str = "") -> list[str]:
        """Expose the methods of ``obj`` marked with :func:`exposed`; returns their remote names."""
        names = []
        for attr, member in inspect.getmembers(type(obj)):
            remote = getattr(member, _EXPOSED_ATTR, None)
            if remote is not None:
                self.expose(getattr(obj, attr), name=prefix + remote)
                names.append(prefix + remote)
        if not names:
            raise ValueError(f"{type(obj).__name__} has no method marked with @exposed")
        return names

    @property
    def functions(self) -> list[str]:
        """The names of the exposed functions."""
        with self._lock:
            return sorted(self._functions)

    # ---- running --------------------------------------------------------------------------

    def start(self) -> Server:
        """Serve from a background thread and return at once (the socket already listens)."""
        if self._thread is not None or self._loop_started:
            raise RuntimeError("the server is already running")
        if self._closing.is_set():
            raise RuntimeError("the server is closed")
        self._loop_started = True
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"socket_rpc-server-{self.address[1]}", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from this thread until :meth:`close` is called (or KeyboardInterrupt)."""
        if self._loop_started:
            raise RuntimeError("the server is already running")
        if self._closing.is_set():
            raise RuntimeError("the server is closed")
        self._loop_started = True
        try:
            self._accept_loop()
        finally:
            self.close()

    def _accept_loop(self) -> None:
        logger.info("socket_rpc server listening on %s:%d", *self.address)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._listener, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._closing.is_set():
                    for key, _ in selector.select():
                        if key.fileobj is self._listener and not self._closing.is_set():
                            self._accept()
        finally:
            self._listener.close()
            self._loop_done.set()

    def _accept(self) -> None:
        try:
            sock, peer = self._listener.accept()
        except OSError as exc:  # e.g. the peer reset before accept, or out of descriptors
            logger.warning("accept failed: %s", exc)
            return
        with self._lock:
            if len(self._connections) >= self._max_connections:
                logger.warning("refusing %s: %d connections open", peer, len(self._connections))
                sock.close()
                return
            thread = threading.Thread(
                target=self._serve_connection,
                args=(sock, peer),
                daemon=True,
                name=f"socket_rpc-conn-{peer[0]}:{peer[1]}",
            )
            self._connections[thread] = sock
        thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and join the threads (at most ``timeout`` s).

        A function still running finishes; its reply has nowhere to go. Safe to call twice.
        """
        if not self._closing.is_set():
            self._closing.set()
            self._wake_w.send(b"\0")
        if self._loop_started:
            self._loop_done.wait(timeout)
        else:
            self._listener.close()
        with self._lock:
            connections = list(self._connections.items())
        for _, sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        end = time.monotonic() + timeout
        current = threading.current_thread()
        for thread, _ in connections:
            if thread is not current:
                thread.join(max(0.0, end - time.monotonic()))
        if self._thread is not None and self._thread is not current:
            self._thread.join(max(0.0, end - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Server:
        if not self._loop_started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- one connection -------------------------------------------------------------------

    def _serve_connection(self, raw: socket.socket, peer: Any) -> None:
        channel = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self._handshake_timeout)
            sock = raw
            if self._ssl_context is not None:
                sock = self._ssl_context.wrap_socket(raw, server_side=True)
                with self._lock:  # wrapping detached ``raw``: close() must shut ``sock`` down
                    self._connections[threading.current_thread()] = sock
            channel = Channel(sock, self._limits, self.spin)
            deadline = time.monotonic() + self._handshake_timeout
            server_handshake(channel, self._token, deadline)
            while not self._closing.is_set():
                frame = channel.receive()
                if frame is None:
                    break
                reply = self._answer(frame)
                del frame  # drop the request's arrays so the channel can reuse their buffer
                channel.send(reply)
                del reply
        except AuthenticationError as exc:
            logger.warning("connection from %s refused: %s", peer, exc)
        except ProtocolError as exc:
            logger.warning("closing the connection from %s: %s", peer, exc)
            if channel is not None:
                self._try_send(
                    channel,
                    {
                        "kind": "error",
                        "id": None,
                        "type": "ProtocolError",
                        "message": str(exc),
                        "traceback": "",
                    },
                )
        except (OSError, SocketRPCError, ssl.SSLError) as exc:
            logger.debug("connection from %s ended: %s", peer, exc)
        except Exception:  # a bug must cost this connection only, never the server
            logger.exception("closing the connection from %s after an unexpected error", peer)
        finally:
            if channel is not None:
                channel.close()
            raw.close()
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    @staticmethod
    def _try_send(channel: Channel, header: dict[str, Any]) -> None:
        try:
            channel.send(pack(header), time.monotonic() + 1.0)
        except (OSError, SocketRPCError):
            pass

    def _answer(self, frame: Frame) -> Any:
        """The packed reply to one call message (a result or an error)."""
        header = frame.header
        call_id = header.get("id")
        name = header.get("function")
        if header.get("kind") != "call" or type(call_id) is not int or not isinstance(name, str):
            raise ProtocolError("expected a call message with an int 'id' and a str 'function'")
        decoder = Decoder(frame.buffers, self._limits)
        try:
            args = decoder.decode(header.get("args", []))
            kwargs_tree = header.get("kwargs")
            kwargs = {} if kwargs_tree is None else decoder.decode(kwargs_tree)
        except ImportError as exc:  # e.g. a tensor arrived and torch is not installed here
            return self._error(call_id, "ImportError", str(exc), "")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ProtocolError("a call's args must be a list and its kwargs a dict")
        func = self._functions.get(name)
        if func is None:
            message = f"no function named {name!r} is exposed; exposed: {', '.join(self.functions)}"
            return self._error(call_id, "UnknownFunctionError", message, "")
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            tb = traceback.format_exc() if self._send_tracebacks else ""
            return self._error(call_id, _type_name(exc), str(exc), tb)
        encoder = Encoder(self._limits.max_depth)
        try:
            # {"kind": "result", "id", "value"} written as JSON text directly (as pack() would)
            written = encoder.write(result)
            start = f'{{"kind":"result","id":{call_id},"value":{written}'
            return pack_text(start, encoder.buffers, encoder.owners)
        except EncodeError as exc:
            message = f"the return value of {name!r} cannot be sent: {exc}"
            return self._error(call_id, "EncodeError", message, "")

    @staticmethod
    def _error(call_id: int, type_name: str, message: str, tb: str) -> Any:
        header = {
            "kind": "error",
            "id": call_id,
            "type": type_name,
            "message": message,
            "traceback": tb,
        }
        return pack(header)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (an IPv4 or IPv6 address or a name; ``"::"`` serves
    IPv6 and, where the system allows, IPv4 too)."""
    if host == "::" and socket.has_dualstack_ipv6():
        return socket.create_server(
            (host, port), family=socket.AF_INET6, backlog=128, dualstack_ipv6=True
        )
    family = socket.AF_INET
    if host:  # "" is every IPv4 interface
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=128, reuse_port=False)
