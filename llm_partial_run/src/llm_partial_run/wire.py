"""The torch.distributed wire: one message per call, a fixed header, nothing pickled.

A message is a :class:`Header` of :data:`HEADER_LEN` little-endian int64 values (kind, session,
step, the ranks that run it, the dtype and shape of a tensor, ...), then a byte payload (control
calls only: JSON, error text) and then the raw bytes of at most two tensors (a step's hidden
states or logits, and its padding mask). When it all fits :data:`INLINE_BYTES` (a decode step
always does) it travels as one gloo message; a larger one goes as the header alone, then the
payload and each tensor as messages of their own on :data:`BULK_TAG`. On CUDA the tensors
always follow on the data group (NCCL), device to device, never through the host.

Receives are posted ahead: a :class:`Receiver` posts the receive of a peer's next message before
it is due. A gloo send to a peer whose receive is posted goes out at once; to one that has not
posted it yet, it first announces itself and waits for the peer's "ready" (three trips instead of
one). Posting is what sends that "ready" (a write that wakes the peer's IO thread), so the owner
picks the moment (:meth:`Receiver.recv`'s ``post_next``): at once when the next message may
already be coming, else once the current one has been handled and passed on.
"""

from __future__ import annotations

import ctypes
import datetime
import math
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

import torch

from .errors import PartialRunError

HEADER_LEN = 21
"""int64 values in a header."""
HEADER_BYTES = HEADER_LEN * 8
INLINE_BYTES = 1 << 20
"""A message up to this size travels as one buffer: each gloo message costs a handshake."""
MAGIC = 0x4C4D_5052_0000_0003
"""First value of every header: ``"LMPR"`` and the wire version (3)."""
assert MAGIC & 0xFF, "a receive's spin poll waits for the first byte to turn non-zero"
HEAD_TAG, BULK_TAG = 0, 1
"""Gloo tags: whole messages and headers on one, the pieces of a large message on the other
(so a receive posted ahead for the next header never takes a piece of the current message)."""
SPIN_PACE = 0.1
"""Seconds: a receive polls (:attr:`Receiver.spin`) only when its messages come at a steady pace
up to this (a decode loop): it sleeps until just before the next is due, and a message that
comes earlier than the pace (a new request) waits until then."""
MAX_NDIM = 4
"""Dimensions of a tensor that a header can describe."""
DTYPES: tuple[torch.dtype | None, ...] = (
    None, torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.bool, torch.uint8, torch.int8, torch.int16,
)  # fmt: skip
"""A tensor's dtype travels as its index here (0: no tensor)."""
_FORMAT = struct.Struct(f"<{HEADER_LEN}q")
_NBYTES, _INLINE, _HOPS = 15, 18, 19  # slots a sender fills in


class Kind(IntEnum):
    """What a message asks. A call goes round the ring and comes back to rank 0 as its own
    answer (its ``status`` says whether a rank refused it)."""

    INFO = 1
    OPEN_SESSION = 2
    FORWARD = 3
    CLOSE_SESSION = 4
    KEEP_ROWS = 5
    JOIN = 6
    PING = 7
    STOP = 8  # every rank passes it on and returns from serve_rank
    ABORT = 9  # every rank passes it on and raises NodeError naming rank ``a``
    STATS = 10


class Status(IntEnum):
    """How a call went (a header's ``status``)."""

    OK = 0
    REFUSED = 1  # SessionError on a rank: the call was refused, the rank is fine
    FAILED = 2  # any other exception on a rank


_KINDS = {int(k): k for k in Kind}
_STATUSES = frozenset(int(s) for s in Status)


class Header(NamedTuple):
    """One message, as the :data:`HEADER_LEN` int64 values that go first on the wire (a named
    tuple: built and read on every transfer, cold after a step's compute).

    ``first``/``last``: the ranks that run the call (the others pass it on); ``a``/``b``: the
    call's arguments (batch size and max length, the other session of a join; for an abort the
    failed rank and the rank that started the abort); ``x_dtype``/``x_shape`` describe the tensor
    that follows (None: none) and ``mask`` says whether a bool ``[B, T]`` mask follows it;
    ``nbytes``: the byte payload's length; ``nanos``: the compute time of the ranks that ran it;
    ``status``: a :class:`Status`; ``inline``: the payload and tensors came in the header's own
    buffer; ``hops``: the transfers the message has made so far; ``ahead``: the calls rank 0
    already had in flight round the ring when it sent this one (0: none before it; a rank then
    posts its next receive only after passing this call on, so the first of several calls sent
    together does not make the ranks post early).
    """

    kind: Kind
    session: int = 0
    step: int = 0
    a: int = 0
    b: int = 0
    first: int = 0
    last: int = 0
    x_dtype: torch.dtype | None = None
    x_shape: tuple[int, ...] = ()
    mask: bool = False
    nbytes: int = 0
    nanos: int = 0
    status: int = 0
    inline: bool = False
    hops: int = 0
    ahead: int = 0

    def values(self) -> list[int]:
        """The header's int64 values, in wire order."""
        if len(self.x_shape) > MAX_NDIM:
            raise PartialRunError(f"a tensor of {len(self.x_shape)} dims cannot be sent "
                                  f"(at most {MAX_NDIM})")  # fmt: skip
        if self.x_dtype not in DTYPES:
            raise PartialRunError(f"dtype {self.x_dtype} cannot be sent; use one of {DTYPES[1:]}")
        shape = [*self.x_shape, *[0] * (MAX_NDIM - len(self.x_shape))]
        return [MAGIC, int(self.kind), self.session, self.step, self.a, self.b, self.first,
                self.last, DTYPES.index(self.x_dtype), len(self.x_shape), *shape,
                int(self.mask), self.nbytes, self.nanos, int(self.status), int(self.inline),
                self.hops, self.ahead]  # fmt: skip

    def pack_into(self, buffer: bytearray | memoryview, offset: int = 0) -> None:
        """Write the header's bytes into ``buffer`` at ``offset``."""
        _FORMAT.pack_into(buffer, offset, *self.values())

    def to_bytes(self) -> bytes:
        """The header's :data:`HEADER_BYTES` bytes."""
        return _FORMAT.pack(*self.values())

    @classmethod
    def unpack_from(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> Header:
        """Read a received header; PartialRunError when it is not one (another program or wire
        version on the other end)."""
        if len(buffer) - offset < HEADER_BYTES:
            raise PartialRunError(f"a header is {HEADER_BYTES} bytes, got {len(buffer) - offset}")
        v = _FORMAT.unpack_from(buffer, offset)
        if v[0] != MAGIC:
            raise PartialRunError(
                f"received a header that is not llm_partial_run wire version 3 (magic "
                f"{v[0]:#x}): run the same llm_partial_run on every rank"
            )
        kind, dtype, ndim, status = _KINDS.get(v[1]), v[8], v[9], v[17]
        if (
            kind is None
            or not 0 <= ndim <= MAX_NDIM
            or not 0 <= dtype < len(DTYPES)
            or v[15] < 0
            or v[20] < 0
            or status not in _STATUSES
        ):
            raise PartialRunError(f"malformed header {list(v)}")
        return cls(kind, v[2], v[3], v[4], v[5], v[6], v[7], DTYPES[dtype],
                   tuple(v[10 : 10 + ndim]), bool(v[14]), v[15], v[16], status, bool(v[18]),
                   v[19], v[20])  # fmt: skip


@dataclass
class Message:
    """A received message: its header, byte payload, tensor and mask (None when absent)."""

    header: Header
    payload: bytes = b""
    x: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class _Buffer:
    """An :data:`INLINE_BYTES` buffer seen as bytes (for the header), as a uint8 tensor (for
    gloo) and as an address (tensors' bytes are moved in and out with one memmove each: a
    torch slice, view and copy cost more than the copy itself)."""

    def __init__(self) -> None:
        self.raw = bytearray(INLINE_BYTES)
        self.tensor = torch.frombuffer(self.raw, dtype=torch.uint8)
        self.address = self.tensor.data_ptr()
        self._heads: dict[int, torch.Tensor] = {}

    def head(self, nbytes: int) -> torch.Tensor:
        """The buffer's first ``nbytes`` as a tensor, kept: a decode step's messages are the
        same size every time, and a slice made anew is a torch call on the step's path."""
        view = self._heads.get(nbytes)
        if view is None:
            if len(self._heads) >= 32:  # prefill sizes vary: keep only the latest few
                self._heads.clear()
            view = self._heads[nbytes] = self.tensor[:nbytes]
        return view


@dataclass
class Pool:
    """Buffers free for the next receive or send (one pool per process side of a wire)."""

    free: list[_Buffer] = field(default_factory=list)

    def take(self) -> _Buffer:
        """A free buffer (a new one when none is free). Safe from several threads: rank 0's
        sender and receiver share a pool, and the test-then-pop of two of them could race."""
        try:
            return self.free.pop()
        except IndexError:
            return _Buffer()


class Receiver:
    """Receives ``peer``'s messages in order, each one's receive posted before it is due.

    ``groups``: the rank's groups (:class:`llm_partial_run.dist.RankGroups`). One reader at once.
    """

    def __init__(self, groups: Any, peer: int, pool: Pool | None = None) -> None:
        self.groups, self.peer = groups, peer
        self.pool = pool or Pool()
        self._span = datetime.timedelta(seconds=groups.timeout)
        self._posted: tuple[Any, _Buffer] | None = None
        self._posted_at = 0.0
        self._lock = threading.Lock()  # rank 0 reads from its callers' threads and stop()
        self.spin = float(getattr(groups, "spin", 0.0))
        """Seconds of busy-polling around a message's expected arrival (0: none); see
        :meth:`recv`."""
        self._came: tuple[float | None, float | None] = (None, None)  # the last 2 arrivals,
        # in seconds after their posting
        self._spare: torch.Tensor | None = None  # the next message's tensor, made ahead
        self._last: tuple[torch.dtype, tuple[int, ...]] | None = None  # the last one's kind
        self.received = 0
        """Messages received from ``peer``."""
        self.caught = 0
        """Messages seen arriving while polling (:attr:`spin`)."""

    @property
    def posted(self) -> bool:
        """True while the next message's receive is posted and no :meth:`recv` has taken it."""
        return self._posted is not None

    def post(self) -> None:
        """Post the receive of the next message (harmless twice; safe from several threads).

        Posting sends the peer a "ready" (a write to its socket that wakes its IO thread), so
        the caller picks the moment: :meth:`recv` posts the next receive itself unless told not
        to, and a rank that knows its next message is far off posts once it has passed the
        current one on (off the path a step waits on)."""
        with self._lock:
            if self._posted is None:
                buffer = self.pool.take()
                buffer.raw[0] = 0  # a header's first byte is never 0: it shows the arrival
                # the gloo backend's own call (RankGroups.headers): dist.recv costs as much again
                work = self.groups.headers.recv([buffer.tensor], self.peer, HEAD_TAG)
                self._posted = (work, buffer)
                self._posted_at = time.perf_counter()
                last = self._last
                if last is not None and self._spare is None and not self.groups.on_cuda:
                    # a decode step's tensor is the same every time: made now, off the path
                    # (a torch.empty after a step's compute costs ~45 us with cold caches)
                    self._spare = torch.empty(last[1], dtype=last[0])

    def recv(self, timeout: float | None = None, *, post_next: bool = True) -> Message:
        """The next message (tensors copied out of the buffer, on this rank's device). Waits
        at most ``timeout`` seconds (default the groups') for each piece; RuntimeError from
        torch.distributed when the peer is gone or silent. ``post_next``: post the next
        message's receive before this one is read (else the caller calls :meth:`post`).

        With :attr:`spin` > 0 and a steady pace (the last two messages came as long after
        their posting, within ``spin / 2``), the wait sleeps until ``spin / 2`` before the
        message is due, then polls the buffer for its first byte until ``spin / 2`` after,
        and only then sleeps in gloo's wait: a gloo receive wakes two threads (gloo's IO
        thread, then the waiter), and a waiter already on a core saves the second wake for
        the CPU time it polls."""
        self.post()
        with self._lock:  # taken: a post() from now on is the next message's receive
            (work, buffer), self._posted = self._posted, None
            posted_at = self._posted_at
        span = self._span if timeout is None else datetime.timedelta(seconds=timeout)
        seen = self._poll(buffer.raw, posted_at) if self.spin > 0 else None
        work.wait(span)  # a failed wait: the wire is broken for good
        if self.spin > 0:  # seconds from posting to arrival, the last two
            came = (seen or time.perf_counter()) - posted_at
            self._came = (came, self._came[0])
        if post_next:  # the next message's receive, before this one is handled
            try:
                self.post()
            except RuntimeError:  # the peer is gone: this message (its ABORT?) still counts;
                pass  # the next recv posts again and raises
        try:
            message = self._read(buffer, span)
        finally:
            self.pool.free.append(buffer)
        self.received += 1
        return message

    def _poll(self, raw: bytearray, posted_at: float) -> float | None:
        """Wait for ``raw``'s first byte around the expected arrival (see :meth:`recv`); the
        moment it was seen, or None when it was not (already there, or not steady, or late)."""
        last, before = self._came
        if (
            raw[0]
            or last is None
            or before is None
            or abs(last - before) > self.spin / 2
            or last > SPIN_PACE
        ):
            return None  # no steady decode pace to go by (idle gaps, pings, calls in flight)
        start = posted_at + last - self.spin / 2
        ahead = start - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        stop = start + self.spin
        while not raw[0]:
            now = time.perf_counter()
            if now > stop:
                return None  # later than expected: sleep on it
            time.sleep(0)  # lets the process's other threads have the GIL
        self.caught += 1
        return time.perf_counter()

    def _read(self, buffer: _Buffer, span: datetime.timedelta) -> Message:
        header = Header.unpack_from(buffer.raw)
        shapes = []
        if header.x_dtype is not None:
            shapes.append((header.x_dtype, header.x_shape))
            if header.mask:
                shapes.append((torch.bool, header.x_shape[:2]))
        if not header.inline:
            payload = self._recv_bytes(header.nbytes, span)
            tensors = [self._recv_tensor(dtype, shape, span) for dtype, shape in shapes]
            return Message(header, payload, *tensors)
        at = HEADER_BYTES + header.nbytes
        payload = bytes(buffer.raw[HEADER_BYTES:at])
        tensors = []
        for dtype, shape in shapes:
            if self.groups.on_cuda:
                tensors.append(self._recv_tensor(dtype, shape, span))
                continue
            # a copy: the buffer takes a later message (and may be misaligned for dtype)
            if tensors:  # a mask: made here (decode steps at batch 1 have none)
                t = torch.empty(shape, dtype=dtype)
            else:  # the step's tensor: the one made ahead when it is of the same kind
                t, self._spare = self._spare, None
                if t is None or self._last != (dtype, shape):
                    t = torch.empty(shape, dtype=dtype)
                    self._last = (dtype, shape)
            n = math.prod(shape) * dtype.itemsize
            ctypes.memmove(t.data_ptr(), buffer.address + at, n)
            tensors.append(t)
            at += n
        return Message(header, payload, *tensors)

    def _recv_bytes(self, nbytes: int, span: datetime.timedelta) -> bytes:
        if not nbytes:
            return b""
        raw = bytearray(nbytes)
        t = torch.frombuffer(raw, dtype=torch.uint8)
        self.groups.headers.recv([t], self.peer, BULK_TAG).wait(span)
        return bytes(raw)

    def _recv_tensor(
        self, dtype: torch.dtype, shape: Sequence[int], span: datetime.timedelta
    ) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype, device=self.groups.device)
        self.groups.data.recv([t], self.peer, BULK_TAG).wait(span)
        return t


class Sender:
    """Posts messages to ``peer``; each :meth:`send` returns at once with a :class:`Sent`."""

    def __init__(self, groups: Any, peer: int, pool: Pool | None = None) -> None:
        self.groups, self.peer = groups, peer
        self.pool = pool or Pool()
        self._span = datetime.timedelta(seconds=groups.timeout)
        self.sent = 0
        """Messages sent to ``peer``."""

    def send(
        self, header: Header, payload: bytes = b"", tensors: Sequence[torch.Tensor] = ()
    ) -> Sent:
        """Post a message; the caller waits on the :class:`Sent` later.

        A message that fits :data:`INLINE_BYTES` is copied into a reused buffer (a fresh one per
        message made gloo's send several times slower) and goes as one message; a larger one as
        the header, then the payload, then each tensor. A gloo send completes only once the peer
        has received it (and a gloo work reports completion only when waited on), so a caller
        waits only once it knows the peer has it, or when it has too many unwaited.
        """
        g = self.groups
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        inline_tensors = [] if g.on_cuda else tensors  # on CUDA they follow over NCCL
        sizes = [t.nbytes for t in inline_tensors]
        size = HEADER_BYTES + len(payload) + sum(sizes)
        values = header.values()
        values[_NBYTES] = len(payload)
        values[_INLINE] = int(size <= INLINE_BYTES)
        values[_HOPS] = header.hops + 1  # this transfer
        if size <= INLINE_BYTES:
            buffer = self.pool.take()
            _FORMAT.pack_into(buffer.raw, 0, *values)
            at = HEADER_BYTES
            if payload:
                buffer.raw[at : at + len(payload)] = payload
                at += len(payload)
            for t, n in zip(inline_tensors, sizes, strict=True):
                ctypes.memmove(buffer.address + at, t.data_ptr(), n)
                at += n
            works = [g.headers.send([buffer.head(at)], self.peer, HEAD_TAG)]
            rest = tensors if g.on_cuda else []
        else:
            buffer = None
            head = torch.frombuffer(bytearray(_FORMAT.pack(*values)), dtype=torch.uint8)
            works = [g.headers.send([head], self.peer, HEAD_TAG)]
            if payload:
                body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                works.append(g.headers.send([body], self.peer, BULK_TAG))
            rest = tensors
        for t in rest:
            works.append(g.data.send([t], self.peer, BULK_TAG))
        self.sent += 1
        return Sent(self, works, buffer)


class Sent:
    """A posted message: its send works (they hold its tensors) and its send buffer, which goes
    back to the pool once the works are waited on."""

    def __init__(self, sender: Sender, works: list[Any], buffer: _Buffer | None) -> None:
        self._sender, self._works, self._buffer = sender, works, buffer

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the peer has the message (at most ``timeout``, default the groups')."""
        sender = self._sender
        span = sender._span if timeout is None else datetime.timedelta(seconds=timeout)
        while self._works:
            self._works[0].wait(span)
            self._works.pop(0)
        if self._buffer is not None:
            sender.pool.free.append(self._buffer)
            self._buffer = None


def described(
    kind: Kind, x: torch.Tensor | None = None, mask: torch.Tensor | None = None, **fields: Any
) -> tuple[Header, list[torch.Tensor]]:
    """The header of a message carrying ``x`` (and ``mask``), and the tensors that follow it."""
    if x is None:
        return Header(kind, **fields), []
    tensors = [x]
    if mask is not None:
        tensors.append(mask if mask.dtype == torch.bool else mask.to(torch.bool))
    header = Header(kind, x_dtype=x.dtype, x_shape=tuple(x.shape), mask=mask is not None, **fields)
    return header, tensors
