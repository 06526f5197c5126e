"""Framing: how one message travels over a socket.

A message is::

    prefix   20 bytes, little-endian: magic b"SRPC", u16 protocol version, u16 flags (0),
             u32 header length, u64 body length
    header   UTF-8 JSON object; its "buffers" entry lists the byte length of each raw buffer
             (absent when there are none)
    body     the raw buffers, each starting at a multiple of 64 bytes (zero padding in between)

Both lengths are checked against :class:`Limits` before anything is allocated. Sending gathers the
prefix, header and every buffer in one ``sendmsg`` (no concatenation copies); receiving reads
through a small staging buffer (one syscall for a small message) and receives the bulk of a large
body straight into the buffer the decoded arrays will wrap.

Waiting for the next message can *spin* first (``spin`` seconds of non-blocking receive attempts
before a blocking one): a reply that comes within the spin is picked up without the thread going to
sleep and being woken again, which on a virtual machine costs tens of microseconds per message.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import select
import socket
import ssl
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import EncodeError, ProtocolError, RPCConnectionError, RPCTimeoutError
from .limits import Limits

MAGIC = b"SRPC"
PROTOCOL_VERSION = 1
PREFIX = struct.Struct("<4sHHIQ")
_PREFIX_SIZE = PREFIX.size
_PREFIX_PACK = PREFIX.pack
_PREFIX_UNPACK = PREFIX.unpack_from
ALIGN = 64

_STAGING_BYTES = 256 * 1024
_SMALL_MESSAGE = 64 * 1024  # TLS: below this, the parts are joined and sent with one call
_MMAP_BODY = 1 << 20  # bodies from this size on get fresh zero pages instead of a memset buffer
_SPARE_MAX = 1 << 30  # a channel keeps its last large body buffer (up to this size) for reuse
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_sched_yield = getattr(os, "sched_yield", lambda: None)

DEFAULT_SPIN = 200e-6
"""Seconds a client or server spins for the next message before blocking (see :class:`Channel`)."""


def check_spin(spin: Any) -> float:
    """``spin`` as a float number of seconds; raises ``ValueError``/``TypeError`` if it is bad.

    A spin must be a real number of seconds (an ``int`` or ``float``, not a ``bool``), finite and
    not negative; 0 turns spinning off.
    """
    if isinstance(spin, bool) or not isinstance(spin, (int, float)):
        raise TypeError(f"spin must be a number of seconds (e.g. 50e-6), not {spin!r}")
    spin = float(spin)
    if not math.isfinite(spin) or spin < 0:
        raise ValueError(f"spin must be a finite number of seconds >= 0 (0: off), not {spin!r}")
    return spin


def _json_encoder() -> Any:
    """A compact JSON encoder; the C one made once when available (json.dumps remakes it)."""
    plain = json.JSONEncoder(separators=(",", ":"), check_circular=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return plain.encode
    c_encode = make(
        None,
        plain.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        True,
    )

    def encode(obj: Any) -> str:
        return "".join(c_encode(obj, 0))

    return encode


# Stateless helpers made once: the C JSON encoder without the per-call set-up of json.dumps.
to_json = _json_encoder()
"""``to_json(obj)``: compact JSON text of ``obj`` (json's C encoder, made once)."""
_scan_json = json.JSONDecoder().scan_once  # raw_decode without its Python wrapper
_IOV_MAX = 512
_ZEROS = bytes(ALIGN)
_CLOSED_MID_MESSAGE = "the peer closed the connection in the middle of a message"


class Frame:
    """One received message: its decoded JSON header and its raw buffers (views on one body)."""

    __slots__ = ("header", "buffers")

    def __init__(self, header: dict[str, Any], buffers: list[memoryview]) -> None:
        self.header = header
        self.buffers = buffers

    def __repr__(self) -> str:
        return f"Frame(header={self.header!r}, buffers={self.buffers!r})"


class Packed:
    """A message ready to send: prefix and header in ``head``, then the body ``parts``.

    ``size`` is the whole message's length; ``owners`` are kept with it until it is sent.
    """

    __slots__ = ("head", "parts", "size", "owners")

    def __init__(self, head: bytes, parts: list[Any], size: int, owners: Any = None) -> None:
        self.head = head
        self.parts = parts
        self.size = size
        self.owners = owners

    def __repr__(self) -> str:
        return f"Packed(head={self.head!r}, parts={self.parts!r}, size={self.size})"


def pack(header: dict[str, Any], buffers: Sequence[memoryview] = (), owners: Any = None) -> Packed:
    """Lay out one message: ``header`` (a JSON-able dict) and the raw ``buffers`` after it.

    ``buffers`` are flat byte memoryviews (as :class:`~socket_rpc.codec.Encoder` makes them);
    they are referenced, not copied, and ``owners`` (the objects whose memory they view) are kept
    with the message until it is sent. Raises :class:`EncodeError` if the header cannot be
    written as JSON.
    """
    if buffers:
        header["buffers"] = [view.nbytes for view in buffers]  # absent means none
    try:
        text = to_json(header)
    except ValueError as exc:  # e.g. an int too long to print
        raise EncodeError(f"cannot encode the message header: {exc}") from None
    return _lay_out(text.encode(), buffers, owners)


def pack_text(start: str, buffers: Sequence[memoryview] = (), owners: Any = None) -> Packed:
    """:func:`pack` of a header already written as JSON text, less its closing brace.

    ``start`` is the compact JSON of the header object without the final ``}`` (for instance
    ``'{"kind":"result","id":7,"value":null'``) and must not have a ``"buffers"`` key: the
    ``"buffers"`` entry is appended here, last, as :func:`pack` writes it.
    """
    if not buffers:
        header_bytes = (start + "}").encode()
        head = _PREFIX_PACK(MAGIC, PROTOCOL_VERSION, 0, len(header_bytes), 0) + header_bytes
        return Packed(head, [], len(head), owners)
    if len(buffers) == 1:
        view = buffers[0]
        nbytes = view.nbytes
        header_bytes = f'{start},"buffers":[{nbytes}]}}'.encode()
        head = _PREFIX_PACK(MAGIC, PROTOCOL_VERSION, 0, len(header_bytes), nbytes) + header_bytes
        return Packed(head, [view] if nbytes else [], len(head) + nbytes, owners)
    sizes = ",".join([str(view.nbytes) for view in buffers])
    return _lay_out(f'{start},"buffers":[{sizes}]}}'.encode(), buffers, owners)


def _lay_out(header_bytes: bytes, buffers: Sequence[memoryview], owners: Any) -> Packed:
    """The prefix, the header and the body parts of a message (buffers 64-byte aligned)."""
    parts: list[Any] = []
    end = 0
    for view in buffers:
        if view.nbytes:  # empty buffers take no room and need no padding
            pad = -end % ALIGN
            if pad:
                parts.append(_ZEROS[:pad])
                end += pad
            parts.append(view)
            end += view.nbytes
    head = _PREFIX_PACK(MAGIC, PROTOCOL_VERSION, 0, len(header_bytes), end) + header_bytes
    return Packed(head, parts, len(head) + end, owners)


def _allocate_body(nbytes: int) -> bytearray | mmap.mmap:
    # A large bytearray is memset to zero by CPython before we overwrite it; an anonymous map
    # comes as untouched zero pages, so receiving into it is the only pass over the memory.
    if nbytes >= _MMAP_BODY:
        return mmap.mmap(-1, nbytes)
    return bytearray(nbytes)


def _buffer_layout(sizes: Any, limits: Limits) -> tuple[list[int], int]:
    """Check the header's buffer lengths; the start of each in the body and the body's length."""
    if not isinstance(sizes, list):
        raise ProtocolError("the header's 'buffers' must be a list of byte lengths")
    if len(sizes) > limits.max_buffers:
        raise ProtocolError(f"{len(sizes)} buffers is over the limit of {limits.max_buffers}")
    offsets = []
    end = 0
    for size in sizes:
        if type(size) is not int or size < 0:
            raise ProtocolError(f"bad buffer length {size!r} in the header")
        if size:  # empty buffers take no room and need no padding (as pack lays them out)
            end += -end % ALIGN
        offsets.append(end)
        end += size
    return offsets, end


class Channel:
    """A connected socket that sends and receives whole messages.

    Not thread-safe: one thread uses a channel at a time (the client hands each call its own
    channel; the server gives each connection its own thread).

    ``spin`` (seconds, 0: off): when :meth:`receive` waits for the start of a message and nothing
    is buffered, it first tries non-blocking receives for up to ``spin`` (never past the
    deadline) and only then blocks. Between attempts it yields the CPU (``sched_yield``); each
    attempt and yield is a syscall, which releases the GIL. TLS sockets never spin (their reads
    go through the TLS layer's buffers).
    """

    def __init__(self, sock: socket.socket, limits: Limits, spin: float = 0.0) -> None:
        self.sock = sock
        self.limits = limits
        self._tls = isinstance(sock, ssl.SSLSocket)
        spin = check_spin(spin)
        self.spin = 0.0 if self._tls else spin
        self._staging = bytearray(_STAGING_BYTES)
        self._staging_view = memoryview(self._staging)
        self._start = 0
        self._end = 0
        self._timeout: float | None = sock.gettimeout()
        self._spare: Any = None
        self._poller: Any = None  # made on the first is_idle_and_open, then reused

    # ---- timeouts -------------------------------------------------------------------------

    def _arm(self, deadline: float | None) -> None:
        if deadline is None:
            timeout = None
        else:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise RPCTimeoutError("timed out")
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    # ---- sending --------------------------------------------------------------------------

    def send(self, message: Packed, deadline: float | None = None) -> None:
        """Send one packed message (see :func:`pack`)."""
        if deadline is not None or self._timeout is not None:
            self._arm(deadline)
        parts = message.parts
        try:
            if not parts:
                self.sock.sendall(message.head)
            elif self._tls and message.size <= _SMALL_MESSAGE:
                self.sock.sendall(b"".join([message.head, *parts]))  # one TLS record
            elif self._tls:
                self.sock.sendall(message.head)
                for part in parts:
                    self.sock.sendall(part)
            elif len(parts) < _IOV_MAX:
                sent = self.sock.sendmsg([message.head, *parts])
                if sent != message.size:
                    _sendmsg_all(self.sock, [message.head, *parts], sent)
            else:
                _sendmsg_all(self.sock, [message.head, *parts])
        except TimeoutError:
            raise RPCTimeoutError("timed out while sending") from None

    # ---- receiving ------------------------------------------------------------------------

    def _recv_into(self, view: memoryview, deadline: float | None) -> int:
        self._arm(deadline)
        try:
            return self.sock.recv_into(view)
        except TimeoutError:
            raise RPCTimeoutError("timed out while waiting for the peer") from None

    def _spin_recv(self, deadline: float | None) -> bool:
        """Spin for the start of a message into the empty staging buffer; False at end of stream.

        Non-blocking receives until bytes (or the end of the stream) arrive or ``spin`` seconds
        have passed, whichever is first, never past ``deadline``. Returns True when it got bytes
        or nothing came (the caller then blocks as usual, which also raises on a passed deadline).
        """
        self._start = self._end = 0
        sock = self.sock
        view = self._staging_view
        until = None  # set when the first attempt finds nothing
        flags = _MSG_DONTWAIT
        if self._timeout is not None or not flags:
            # A socket with a timeout polls before each receive: make it non-blocking instead.
            # The next _arm restores the timeout for the blocking wait.
            if self._timeout != 0.0:
                sock.settimeout(0.0)
                self._timeout = 0.0
            flags = 0
        while True:
            try:
                n = sock.recv_into(view, 0, flags)
            except (BlockingIOError, InterruptedError):
                now = time.monotonic()
                if until is None:
                    until = now + self.spin
                    if deadline is not None and deadline < until:
                        until = deadline
                if now >= until:
                    return True
                # Let a thread waiting for this CPU run (often the peer we wait for, woken onto
                # this CPU): without it, a busy machine turns every spin into a full-length one.
                _sched_yield()
                continue
            self._end = n
            return n > 0

    def _fill_prefix(self, deadline: float | None) -> bool:
        """Wait for the next message's prefix (spinning first if nothing is staged)."""
        if self.spin and self._end == self._start and not self._spin_recv(deadline):
            return False
        return self._end - self._start >= PREFIX.size or self._fill(PREFIX.size, deadline, True)

    def _fill(self, need: int, deadline: float | None, at_boundary: bool = False) -> bool:
        """Make ``need`` bytes available in the staging buffer; False on a clean end of stream."""
        if self._start == self._end:
            self._start = self._end = 0  # empty: read into the whole staging buffer again
        while self._end - self._start < need:
            if _STAGING_BYTES - self._start < need:
                kept = self._end - self._start
                self._staging[:kept] = self._staging[self._start : self._end]
                self._start, self._end = 0, kept
            n = self._recv_into(self._staging_view[self._end :], deadline)
            if n == 0:
                if at_boundary and self._end == self._start:
                    return False
                raise RPCConnectionError(_CLOSED_MID_MESSAGE)
            self._end += n
        return True

    def _read_exact(self, nbytes: int, deadline: float | None, into: Any) -> None:
        """Fill the writable ``into`` (``nbytes`` long): staged bytes first, then the socket."""
        target = memoryview(into)
        staged = min(self._end - self._start, nbytes)
        if staged:
            target[:staged] = self._staging_view[self._start : self._start + staged]
            self._start += staged
        got = staged
        while got < nbytes:
            n = self._recv_into(target[got:nbytes], deadline)
            if n == 0:
                raise RPCConnectionError(_CLOSED_MID_MESSAGE)
            got += n
        target.release()

    def receive(self, deadline: float | None = None, limits: Limits | None = None) -> Frame | None:
        """Receive one message; ``None`` when the peer closed the connection between messages.

        Raises:
            ProtocolError: the message breaks the format or a limit (checked before allocating).
            RPCConnectionError: the stream ended in the middle of a message.
            RPCTimeoutError: the deadline passed.
        """
        limits = limits or self.limits
        start = self._start
        if self._end - start < _PREFIX_SIZE:
            if not self._fill_prefix(deadline):
                return None
            start = self._start
        magic, version, flags, header_len, body_len = _PREFIX_UNPACK(self._staging, start)
        if (
            magic != MAGIC
            or version != PROTOCOL_VERSION
            or flags
            or header_len > limits.max_header_bytes
            or body_len > limits.max_body_bytes
        ):
            _refuse_prefix(magic, version, flags, header_len, body_len, limits)
        self._start = start + _PREFIX_SIZE
        raw = self._read_header(header_len, deadline)
        # The header: one JSON object, nothing after it.
        try:
            text = str(raw, "utf-8")
            header, parsed = _scan_json(text, 0)
        except StopIteration:  # what the scanner raises where no JSON value starts
            raise ProtocolError("the message header is not valid JSON: expecting a value") from None
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"the message header is not valid JSON: {exc}") from None
        if parsed != len(text):
            raise ProtocolError("the message header has bytes after its JSON object")
        if type(header) is not dict:
            raise ProtocolError("the message header must be a JSON object")
        sizes = header.get("buffers")
        if sizes is None:
            if not body_len:
                return Frame(header, [])
        elif (
            type(sizes) is list
            and len(sizes) == 1
            and body_len
            and type(sizes[0]) is int
            and sizes[0] == body_len
            and limits.max_buffers
        ):  # one buffer filling the body: what _buffer_layout would accept, checked directly
            return Frame(header, [self._body(body_len, deadline)])
        offsets, expected = _buffer_layout(sizes, limits)
        if expected != body_len:
            raise ProtocolError(
                f"the header's buffers need a body of {expected} bytes, the prefix says {body_len}"
            )
        if body_len == 0:
            return Frame(header, [memoryview(b"")] * len(sizes))
        whole = self._body(body_len, deadline)
        return Frame(header, [whole[o : o + s] for o, s in zip(offsets, sizes, strict=True)])

    def _body(self, body_len: int, deadline: float | None) -> memoryview:
        """The next ``body_len`` bytes in a buffer of their own (never the staging buffer)."""
        start = self._start
        if self._end - start >= body_len:  # staged: copied out, the staging buffer is reused
            self._start = start + body_len
            return memoryview(self._staging[start : start + body_len])
        body = self._body_buffer(body_len)
        self._read_exact(body_len, deadline, body)
        return memoryview(body)

    def _body_buffer(self, nbytes: int) -> Any:
        """A buffer for a large body: the spare one if nothing references it any more, else new.

        Received arrays wrap the body buffer, so it can only be reused once every array made
        from it is gone: the reference count says so (the spare slot and the call's argument are
        the only references then). Reusing it saves allocating and page-faulting the memory anew
        on every large message.
        """
        spare = self._spare
        if spare is not None and len(spare) >= nbytes and sys.getrefcount(spare) <= 3:
            return memoryview(spare)[:nbytes]
        self._spare = None
        del spare
        body = _allocate_body(nbytes)
        if nbytes <= _SPARE_MAX:
            self._spare = body
        return body

    def _read_header(self, header_len: int, deadline: float | None) -> Any:
        """The header's bytes: a view of the staging buffer, or a buffer of their own if larger."""
        if header_len <= _STAGING_BYTES:
            if self._end - self._start < header_len:
                self._fill(header_len, deadline)
            raw = self._staging_view[self._start : self._start + header_len]
            self._start += header_len
            return raw
        raw = bytearray(header_len)
        self._read_exact(header_len, deadline, raw)
        return raw

    # ---- state ----------------------------------------------------------------------------

    def is_idle_and_open(self) -> bool:
        """True if nothing has arrived since the last reply and the peer has not hung up.

        An idle connection must have nothing to read; anything readable is either the end of the
        stream (the server went away) or bytes that should not be there. Both make it unusable.
        """
        if self._end != self._start or (self._tls and self.sock.pending()):
            return False
        if not self._readable_now():
            return True
        if not self._tls:
            return False
        # TLS 1.3 sends session tickets after the handshake: readable, but no application data.
        previous = self.sock.gettimeout()
        try:
            self.sock.settimeout(0)
            data = self.sock.recv(1)
        except ssl.SSLWantReadError:
            return True
        except OSError:
            return False
        finally:
            try:
                self.sock.settimeout(previous)
            except OSError:
                pass
        if data:
            self._staging[0:1] = data
            self._start, self._end = 0, 1
        return False

    def _readable_now(self) -> bool:
        """Whether the socket has something to read (data or end of stream) right now."""
        try:
            if self._poller is None:
                if not hasattr(select, "poll"):
                    return bool(select.select([self.sock], [], [], 0)[0])
                self._poller = select.poll()
                self._poller.register(self.sock, select.POLLIN)
            return bool(self._poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Close the socket; safe to call more than once."""
        try:
            self.sock.close()
        except OSError:
            pass


def _refuse_prefix(
    magic: bytes, version: int, flags: int, header_len: int, body_len: int, limits: Limits
) -> None:
    """Raise the :class:`ProtocolError` that says what is wrong with a message prefix."""
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: the peer does not speak socket_rpc")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    if flags:
        raise ProtocolError(f"unknown flags {flags:#x} in the message prefix")
    if header_len > limits.max_header_bytes:
        raise ProtocolError(
            f"header of {header_len} bytes is over the limit of {limits.max_header_bytes}"
        )
    raise ProtocolError(f"body of {body_len} bytes is over the limit of {limits.max_body_bytes}")


def _sendmsg_all(sock: socket.socket, parts: list[Any], sent: int = 0) -> None:
    """``sendall`` of a list of buffers through ``sendmsg``: no copy, few syscalls.

    ``sent`` bytes of them have gone already.
    """
    views = [p if isinstance(p, memoryview) else memoryview(p) for p in parts]
    i = 0
    while True:
        while sent:  # skip what has been sent
            size = views[i].nbytes
            if sent >= size:
                sent -= size
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
        if i >= len(views):
            return
        sent = sock.sendmsg(views[i : i + _IOV_MAX])
