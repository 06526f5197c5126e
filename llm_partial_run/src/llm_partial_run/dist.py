"""Fixed clusters on torch.distributed: parts on ranks, driven from rank 0 through PartLinks.

Every rank holds one part. Ranks above 0 run :func:`serve_rank`, a loop that receives calls from
rank 0 and runs them on a :class:`~llm_partial_run.local.LocalLink` of their part (so sessions,
KV caches and step numbers behave exactly as on a socket node). Rank 0 holds a
:class:`RankLink` per other rank -- a :class:`~llm_partial_run.transport.PartLink` -- and drives
the same :class:`~llm_partial_run.session.Session` as the socket pipeline, so the sampler, the
``generate`` CLI and the HTTP API run unchanged on top (:mod:`llm_partial_run.launch`).

The wire, with nothing pickled: a call is a fixed header of :data:`HEADER_LEN` int64 values
(:class:`Header`: magic and wire version, call kind, session number, step, two arguments, the
dtype code and shape of a tensor, whether a mask follows, the length of a byte payload), then
the byte payload (UTF-8 JSON or text) and then the tensors' bytes -- all in one buffer when they
fit :data:`INLINE_BYTES` (a decode step's always do), else as separate messages. Headers and
byte payloads travel on a gloo group (CPU); hidden states on the data group: gloo on CPU, NCCL
on CUDA (device tensors, never through the host). A reply is a header of kind ``OK`` or
``ERROR`` followed the same way by its payload and tensor. A rank answers its calls in the order
they came, so a :class:`RankLink` matches replies to calls by order alone, and several calls may
be in flight on one link (:meth:`RankLink.submit_forward`, :func:`forward_in_flight`): rank 0
sends micro-batch k+1 before k's result is back and the ranks compute at the same time.

Faults: every receive waits at most ``timeout`` seconds; a peer that dies closes its gloo
connections and the waiting side fails at once. Rank 0 raises
:class:`~llm_partial_run.errors.NodeError` naming the rank, tells every other rank to stop with
that error (``ABORT``) and exits; a worker that loses rank 0 exits naming rank 0. While rank 0
is idle a heartbeat pings each idle rank every ``timeout / 3`` seconds, so a worker's wait never
times out on a healthy cluster and a rank that dies between requests is noticed. Recovery is
torchrun's: ``--max-restarts N`` restarts the whole group, which reloads every part.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from .errors import NodeError, PartialRunError, SessionError
from .transport import PartInfo, PartLink

log = logging.getLogger(__name__)

HEADER_LEN = 17
"""int64 values in a header."""
HEADER_BYTES = HEADER_LEN * 8
INLINE_BYTES = 1 << 20
"""A message up to this size travels as one buffer (a decode step's hidden states and logits
do): each gloo message costs a handshake, so one message per call instead of three."""
MAGIC = 0x4C4D_5052_0000_0001
"""First value of every header: ``"LMPR"`` and the wire version (1)."""
_UNSENT_REPLIES = 4  # a worker waits on its oldest reply's send beyond this many
MAX_NDIM = 4
"""Dimensions of a tensor that a header can describe."""
DTYPES: tuple[torch.dtype | None, ...] = (
    None, torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.bool, torch.uint8, torch.int8, torch.int16,
)  # fmt: skip
"""A tensor's dtype travels as its index here (0: no tensor)."""


class Kind(IntEnum):
    """What a header is: a call from rank 0, or a worker's reply."""

    INFO = 1
    OPEN_SESSION = 2
    FORWARD = 3
    CLOSE_SESSION = 4
    KEEP_ROWS = 5
    JOIN = 6
    PING = 7
    STOP = 8  # no reply: the worker returns from serve_rank
    ABORT = 9  # no reply: the worker raises NodeError naming rank ``a`` with the payload text
    OK = 100
    ERROR = 101


class Status(IntEnum):
    """Why an ``ERROR`` reply failed (its ``status``)."""

    REFUSED = 1  # SessionError on the worker: the call was refused, the rank is fine
    FAILED = 2  # any other exception on the worker


# header slots
_MAGIC, _KIND, _SESSION, _STEP, _A, _B, _DTYPE, _NDIM, _SHAPE = 0, 1, 2, 3, 4, 5, 6, 7, 8
_MASK, _NBYTES, _NANOS, _STATUS, _INLINE = 12, 13, 14, 15, 16


@dataclass(frozen=True)
class Header:
    """One call or reply, as the :data:`HEADER_LEN` int64 values that go first on the wire.

    ``x_dtype``/``x_shape`` describe the tensor that follows (None: none); ``mask`` says whether
    a bool ``[B, T]`` mask (``x_shape[:2]``) follows it; ``nbytes`` is the length of the byte
    payload; ``nanos`` carries a reply's compute time; ``a``/``b`` are the call's arguments
    (batch size and max length, the other session of a join, the rank an abort names);
    ``inline`` says the payload and tensors came in the header's own buffer.
    """

    kind: Kind
    session: int = 0
    step: int = 0
    a: int = 0
    b: int = 0
    x_dtype: torch.dtype | None = None
    x_shape: tuple[int, ...] = ()
    mask: bool = False
    nbytes: int = 0
    nanos: int = 0
    status: int = 0
    inline: bool = False

    def to_tensor(self) -> torch.Tensor:
        """The header as an int64 tensor of :data:`HEADER_LEN` values."""
        if len(self.x_shape) > MAX_NDIM:
            raise PartialRunError(f"a tensor of {len(self.x_shape)} dims cannot be sent "
                                  f"(at most {MAX_NDIM})")  # fmt: skip
        if self.x_dtype not in DTYPES:
            raise PartialRunError(f"dtype {self.x_dtype} cannot be sent; use one of {DTYPES[1:]}")
        values = [0] * HEADER_LEN
        values[_MAGIC], values[_KIND], values[_SESSION] = MAGIC, int(self.kind), self.session
        values[_STEP], values[_A], values[_B] = self.step, self.a, self.b
        values[_DTYPE], values[_NDIM] = DTYPES.index(self.x_dtype), len(self.x_shape)
        values[_SHAPE : _SHAPE + len(self.x_shape)] = self.x_shape
        values[_MASK], values[_NBYTES] = int(self.mask), self.nbytes
        values[_NANOS], values[_STATUS] = self.nanos, self.status
        values[_INLINE] = int(self.inline)
        return torch.tensor(values, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Header:
        """Read a received header; PartialRunError when it is not one (another program or
        wire version on the other end)."""
        v = t.tolist()
        if len(v) != HEADER_LEN or v[_MAGIC] != MAGIC:
            raise PartialRunError(
                f"received a header that is not llm_partial_run wire version 1 (magic "
                f"{v[_MAGIC] if v else None:#x}): run the same llm_partial_run on every rank"
            )
        ndim, dtype = v[_NDIM], v[_DTYPE]
        if v[_KIND] not in Kind._value2member_map_ or not 0 <= ndim <= MAX_NDIM:
            raise PartialRunError(f"malformed header {v}")
        if not 0 <= dtype < len(DTYPES) or v[_NBYTES] < 0:
            raise PartialRunError(f"malformed header {v}")
        return cls(
            Kind(v[_KIND]), v[_SESSION], v[_STEP], v[_A], v[_B], DTYPES[dtype],
            tuple(v[_SHAPE : _SHAPE + ndim]), bool(v[_MASK]), v[_NBYTES], v[_NANOS], v[_STATUS],
            bool(v[_INLINE]),
        )  # fmt: skip


@dataclass(frozen=True)
class RankGroups:
    """This process's place in the cluster: its rank, the groups the wire uses, its device and
    the seconds any receive may wait (``timeout``)."""

    rank: int
    world_size: int
    device: torch.device
    headers: Any  # a gloo group: headers and byte payloads, CPU tensors
    data: Any  # hidden states: the same gloo group on CPU, an NCCL group on CUDA
    timeout: float

    @property
    def on_cuda(self) -> bool:
        """True when hidden states travel over NCCL as device tensors."""
        return self.device.type == "cuda"


def init_ranks(device: str = "cpu", *, timeout: float = 60.0) -> RankGroups:
    """Join the cluster torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``; ``LOCAL_RANK`` picks the GPU) and make the wire's groups.

    ``device``: ``"cpu"`` (gloo carries everything) or ``"cuda"`` (rank r uses ``cuda:LOCAL_RANK``;
    NCCL carries hidden states, a gloo group the headers). ``timeout``: seconds any call may wait
    for a peer before the cluster is declared broken; it must exceed the longest step.
    """
    if device not in ("cpu", "cuda"):
        raise PartialRunError(f"device must be 'cpu' or 'cuda', got {device!r}")
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise PartialRunError(
            f"environment variables {', '.join(missing)} are not set: start this under torchrun "
            "(torchrun --nproc-per-node N -m llm_partial_run.launch ...)"
        )
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise PartialRunError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    span = datetime.timedelta(seconds=timeout)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PartialRunError("--device cuda but torch sees no CUDA device")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=span)
        headers = dist.new_group(backend="gloo", timeout=span)
        data = dist.group.WORLD
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=span)
        headers = data = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("rank %d of %d on %s (timeout %.0f s)", rank, world, dev, timeout)
    return RankGroups(rank, world, dev, headers, data, float(timeout))


def close_ranks() -> None:
    """Leave the cluster (destroy the process groups); harmless when not in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- the wire ---------------------------------------------------------------------------------


class _Wire:
    """Sends and receives one peer's messages (header, byte payload, tensors) in order."""

    def __init__(self, groups: RankGroups, peer: int) -> None:
        self.groups, self.peer = groups, peer
        self._span = datetime.timedelta(seconds=groups.timeout)
        self._buf = torch.empty(INLINE_BYTES, dtype=torch.uint8)  # receives; one reader at once
        self._free: list[torch.Tensor] = []  # send buffers whose last send completed

    def send(
        self, header: Header, payload: bytes = b"", tensors: Sequence[torch.Tensor] = ()
    ) -> _Sent:
        """Post a message and return at once; the caller waits on the result later.

        A message that fits :data:`INLINE_BYTES` goes as one buffer: header, payload and (on
        CPU) the tensors' bytes, copied into a reused send buffer (a freshly allocated one per
        message made gloo's send several times slower); a larger one as the header, then the
        payload, then each tensor. On CUDA the tensors always follow on the NCCL group. A gloo
        send completes only once the peer posts the receive (and a gloo work reports completion
        only when waited on), so a caller waits (:meth:`_Sent.wait`) only after reading the
        peer's reply, or when it has too many unwaited: two ranks sending to each other at once
        would otherwise wait on each other.
        """
        g = self.groups
        inline_tensors = [] if g.on_cuda else [_as_bytes(t) for t in tensors]
        body = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None
        size = HEADER_BYTES + len(payload) + sum(t.numel() for t in inline_tensors)
        inline = size <= INLINE_BYTES
        head = replace(header, nbytes=len(payload), inline=inline).to_tensor().view(torch.uint8)
        buffer = None
        if inline:
            buffer = (
                self._free.pop() if self._free else torch.empty(INLINE_BYTES, dtype=torch.uint8)
            )
            at = 0
            for piece in (head, *([body] if body is not None else []), *inline_tensors):
                buffer[at : at + piece.numel()].copy_(piece)
                at += piece.numel()
            works = [dist.isend(buffer[:at], self.peer, group=g.headers)]
            rest = list(tensors) if g.on_cuda else []
        else:
            works = [dist.isend(head, self.peer, group=g.headers)]
            if body is not None:
                works.append(dist.isend(body, self.peer, group=g.headers))
            rest = list(tensors)
        for t in rest:
            works.append(dist.isend(t.contiguous(), self.peer, group=g.data))
        return _Sent(self, works, buffer)

    def recv(self) -> tuple[Header, bytes, torch.Tensor | None, torch.Tensor | None]:
        """The next message: its header, payload, tensor and mask (tensors on this rank's
        device). Waits at most the groups' timeout for each piece."""
        dist.irecv(self._buf, self.peer, group=self.groups.headers).wait(self._span)
        header = Header.from_tensor(self._buf[:HEADER_BYTES].view(torch.int64))
        shapes = []
        if header.x_dtype is not None:
            shapes.append((header.x_dtype, header.x_shape))
            if header.mask:
                shapes.append((torch.bool, header.x_shape[:2]))
        if not header.inline:
            payload = self._recv_bytes(header.nbytes)
            tensors = [self._recv_tensor(dtype, shape) for dtype, shape in shapes]
            return header, payload, *_pair(tensors)
        at = HEADER_BYTES + header.nbytes
        payload = bytes(self._buf[HEADER_BYTES:at].tolist())  # small: JSON, error text
        tensors = []
        for dtype, shape in shapes:
            if self.groups.on_cuda:
                tensors.append(self._recv_tensor(dtype, shape))
                continue
            n = _nbytes(dtype, shape)
            # a copy: the buffer takes the next message (and may be misaligned for dtype)
            tensors.append(self._buf[at : at + n].clone().view(dtype).view(shape))
            at += n
        return header, payload, *_pair(tensors)

    def _recv_bytes(self, nbytes: int) -> bytes:
        if not nbytes:
            return b""
        t = torch.empty(nbytes, dtype=torch.uint8)
        dist.irecv(t, self.peer, group=self.groups.headers).wait(self._span)
        return bytes(t.tolist())

    def _recv_tensor(self, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype, device=self.groups.device)
        dist.irecv(t, self.peer, group=self.groups.data).wait(self._span)
        return t


class _Sent:
    """A posted message: its send works (they hold its tensors) and its send buffer, which
    goes back to the wire once the works are waited on."""

    def __init__(self, wire: _Wire, works: list[Any], buffer: torch.Tensor | None) -> None:
        self._wire, self._works, self._buffer = wire, works, buffer

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the message was received (at most ``timeout``, default the groups')."""
        wire = self._wire
        span = wire._span if timeout is None else datetime.timedelta(seconds=timeout)
        while self._works:
            self._works[0].wait(span)
            self._works.pop(0)
        if self._buffer is not None:
            wire._free.append(self._buffer)
            self._buffer = None


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (a view when it is contiguous)."""
    return t.contiguous().view(-1).view(torch.uint8)


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def _pair(tensors: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (tensors + [None, None])[0], (tensors + [None, None])[1]


def _described(kind: Kind, x: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               **fields: Any) -> tuple[Header, list[torch.Tensor]]:  # fmt: skip
    if x is None:
        return Header(kind, **fields), []
    tensors = [x]
    if mask is not None:
        tensors.append(mask.to(torch.bool))
    header = Header(kind, x_dtype=x.dtype, x_shape=tuple(x.shape), mask=mask is not None, **fields)
    return header, tensors


# ---- rank 0: a PartLink per rank ------------------------------------------------------------


@dataclass
class _Reply:
    header: Header
    payload: bytes
    x: torch.Tensor | None


class PendingCall:
    """A call sent to a rank whose reply has not been read yet; :meth:`result` reads it.

    Replies come in the order calls were sent, so ``result`` first waits for the replies of
    the calls sent before this one to be read (by whichever thread holds them).
    """

    def __init__(self, link: RankLink, ticket: int, kind: Kind, sent: _Sent) -> None:
        self._link, self._ticket, self.kind = link, ticket, kind
        self._sent: _Sent | None = sent  # the call as posted (its works hold its tensors)
        self._reply: _Reply | None = None

    def reply(self) -> _Reply:
        """The raw reply (read once, then kept); NodeError when the rank failed."""
        if self._reply is None:
            self._reply = self._link._read_reply(self._ticket, self.kind, self._sent)
            self._sent = None
        return self._reply

    def result(self) -> tuple[torch.Tensor, float]:
        """A forward call's output and the seconds the rank computed."""
        reply = self.reply()
        if reply.x is None:
            raise NodeError(self._link.name, f"a {self.kind.name} reply carried no tensor")
        return reply.x, reply.header.nanos / 1e9


class RankLink:
    """A :class:`~llm_partial_run.transport.PartLink` to the part on ``rank``, from rank 0.

    Session ids (strings) become numbers on the wire, assigned here. Thread-safe: calls from
    several threads are sent whole, one at a time, and their replies read in the same order.
    """

    def __init__(self, rank: int, groups: RankGroups) -> None:
        if groups.rank != 0 or not 0 < rank < groups.world_size:
            raise PartialRunError(
                f"a RankLink is made on rank 0 for a rank in 1..{groups.world_size - 1}; "
                f"this is rank {groups.rank}, asked for rank {rank}"
            )
        self.rank = rank
        self.name = f"rank {rank}"
        self._wire = _Wire(groups, rank)
        self._send_lock = threading.Lock()
        self._turn = threading.Condition()
        self._sent = 0  # tickets handed out
        self._read = 0  # replies read
        self._numbers: dict[str, int] = {}
        self._next_number = itertools.count(1)
        self.one_at_a_time = groups.on_cuda
        """True over NCCL: a forward is sent only once the previous call's reply was read.
        NCCL runs a pair's sends and receives in one stream, in the order they were issued, so
        rank 0 sending k+1 before receiving k while the rank sends k before receiving k+1 could
        wait on each other; gloo matches them independently."""
        self._failed: NodeError | None = None  # the transport broke
        self._stopped: NodeError | None = None  # rank 0 sent STOP or ABORT
        self.last_used = time.monotonic()
        self._info: PartInfo | None = None

    def __repr__(self) -> str:
        return f"RankLink({self.rank})"

    @property
    def failed(self) -> NodeError | None:
        """The error that broke this link (then every call raises it), or None."""
        return self._failed

    @property
    def busy(self) -> bool:
        """True while a call's reply has not been read."""
        return self._read < self._sent

    # ---- PartLink ---------------------------------------------------------------------------

    def info(self) -> PartInfo:
        """The rank's part: architecture, spec, layer count, dtype, device."""
        if self._info is None:
            reply = self._call(Kind.INFO).reply()
            self._info = PartInfo.from_dict(json.loads(reply.payload.decode()))
        return self._info

    def open_session(self, session_id: str, batch_size: int, max_len: int) -> None:
        """Open the session on the rank (its number on the wire is assigned here)."""
        number = self._numbers.get(session_id)
        if number is None:
            number = self._numbers[session_id] = next(self._next_number)
        try:
            self._call(Kind.OPEN_SESSION, session=number, a=batch_size, b=max_len).reply()
        except SessionError:
            if self._numbers.get(session_id) == number:
                del self._numbers[session_id]
            raise

    def forward(
        self, session_id: str, step: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]:
        """Run a step on the rank; returns its output (on this rank's device) and compute time."""
        return self.submit_forward(session_id, step, x, mask).result()

    def submit_forward(
        self, session_id: str, step: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> PendingCall:
        """Send a step and return at once; ``.result()`` later gives what :meth:`forward` does."""
        x = x.to(self._wire.groups.device)
        mask = None if mask is None else mask.to(self._wire.groups.device)
        return self._call(Kind.FORWARD, x, mask, session=self._number(session_id), step=step)

    def close_session(self, session_id: str) -> None:
        """Free the session on the rank; unknown ids are ignored."""
        number = self._numbers.pop(session_id, None)
        if number is not None:
            self._call(Kind.CLOSE_SESSION, session=number).reply()

    def keep_rows(self, session_id: str, rows: list[int]) -> None:
        """Keep only these rows of the session's batch, in this order."""
        if not isinstance(rows, (list, tuple)) or not all(isinstance(r, int) for r in rows):
            raise SessionError(f"rows must be a list of ints, got {rows!r}")
        payload = json.dumps(list(rows)).encode()
        self._call(Kind.KEEP_ROWS, session=self._number(session_id), payload=payload).reply()

    def join(self, session_id: str, other_session_id: str) -> None:
        """Append the other session's rows to this one on the rank; the other is closed."""
        number, other = self._number(session_id), self._number(other_session_id)
        self._call(Kind.JOIN, session=number, a=other).reply()
        self._numbers.pop(other_session_id, None)

    def close(self) -> None:
        """Nothing to release per link (the cluster's :meth:`Cluster.close` stops the ranks)."""

    # ---- beyond PartLink --------------------------------------------------------------------

    def ping(self) -> None:
        """A round trip that keeps an idle rank's wait alive and checks the rank is there."""
        self._call(Kind.PING).reply()

    def stop(self, kind: Kind = Kind.STOP, failed_rank: int = 0, reason: str = "") -> None:
        """Tell the rank to stop (``STOP``) or to exit with an error naming ``failed_rank``
        (``ABORT``); no reply. Best effort: a rank already gone is ignored."""
        if self._failed is not None or self._stopped is not None:
            return
        header = Header(kind, a=failed_rank)
        try:
            with self._send_lock:
                sent = self._wire.send(header, reason.encode())
            sent.wait(min(self._wire.groups.timeout, 10.0))
        except RuntimeError as exc:
            log.debug("%s: %s not delivered: %s", self.name, kind.name, exc)
        self._stopped = NodeError(self.name, f"stopped by rank 0 ({kind.name})")

    def _number(self, session_id: str) -> int:
        number = self._numbers.get(session_id)
        if number is None:
            raise SessionError(f"{self.name}: no open session {session_id!r}")
        return number

    def _call(self, kind: Kind, x: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              *, payload: bytes = b"", **fields: Any) -> PendingCall:  # fmt: skip
        header, tensors = _described(kind, x, mask, **fields)
        with self._send_lock:
            if self.one_at_a_time and tensors:
                self._wait_idle(kind)
            if self._failed is not None or self._stopped is not None:
                raise self._failed or self._stopped
            try:
                sent = self._wire.send(header, payload, tensors)
            except RuntimeError as exc:
                raise self._fail(f"sending {kind.name} failed: {_first_line(exc)}") from exc
            ticket = self._sent
            self._sent += 1
            self.last_used = time.monotonic()
        return PendingCall(self, ticket, kind, sent)

    def _wait_idle(self, kind: Kind) -> None:
        with self._turn:
            done = lambda: self._read == self._sent or self._failed is not None  # noqa: E731
            if not self._turn.wait_for(done, timeout=self._wire.groups.timeout):
                raise PartialRunError(
                    f"{self.name}: {kind.name} waited {self._wire.groups.timeout} s for the "
                    "previous call's reply to be read: over NCCL a rank takes one forward at a "
                    "time (read the last result first; forward_in_flight does)"
                )

    def _read_reply(self, ticket: int, kind: Kind, sent: _Sent) -> _Reply:
        with self._turn:
            self._turn.wait_for(lambda: self._read == ticket or self._failed is not None)
            if self._failed is not None:
                raise self._failed
            try:
                header, payload, x, _ = self._wire.recv()
                sent.wait()  # done at once: the rank answered after receiving it
            except (RuntimeError, PartialRunError) as exc:
                raise self._fail(f"no answer to {kind.name}: {_first_line(exc)}") from exc
            finally:
                self._read += 1
                self.last_used = time.monotonic()
                self._turn.notify_all()
        if header.kind == Kind.ERROR:
            text = payload.decode(errors="replace")
            if header.status == Status.REFUSED:
                raise SessionError(text)
            raise SessionError(f"{self.name} refused {kind.name}: {text}")
        if header.kind != Kind.OK:
            raise self._fail(f"answered {kind.name} with a {header.kind.name} header")
        return _Reply(header, payload, x)

    def _fail(self, reason: str) -> NodeError:
        if self._failed is None:
            self._failed = NodeError(self.name, reason)
            log.error("%s", self._failed)
        with self._turn:
            self._turn.notify_all()
        return self._failed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def forward_in_flight(
    links: Sequence[PartLink],
    session_ids: Sequence[str],
    step: int | Sequence[int],
    xs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None] | None = None,
    *,
    then: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Run several sessions (micro-batches) through the chain ``links`` at once.

    A :class:`RankLink` is sent the next micro-batch before the previous one's result is back,
    so while rank 2 computes micro-batch k, rank 1 computes k+1 and this process k+2 on its own
    part (over NCCL a rank is sent its next micro-batch once its last result is read:
    :attr:`RankLink.one_at_a_time`). Links without ``submit_forward`` (a LocalLink) run in this
    thread. ``step`` is one step number for every session or one per session.

    Without ``then`` this is one step of every session. With it, ``then(k, output)`` is called
    as soon as micro-batch k's output (the last link's: logits) is back and returns its next
    input (run as the session's next step, no padding) or None when k is done: sequences
    decode independently, with no barrier at each step, so the ranks stay busy. Returns each
    micro-batch's last output, in order.
    """
    n = len(xs)
    steps = [step] * n if isinstance(step, int) else list(step)
    masks = list(masks) if masks is not None else [None] * n
    if not (len(session_ids) == len(steps) == len(masks) == n):
        raise PartialRunError("forward_in_flight needs one session id, step and mask per x")
    stage, value, out = [0] * n, list(xs), list(xs)
    pending: deque[tuple[int, PendingCall]] = deque()  # (micro-batch, call), oldest first
    busy = [0] * len(links)  # calls in flight per link
    queued: list[deque[int]] = [deque() for _ in links]  # micro-batches waiting for a link

    def advance(k: int) -> None:
        while True:
            while stage[k] < len(links):
                i = stage[k]
                link = links[i]
                submit = getattr(link, "submit_forward", None)
                if submit is None:
                    value[k], _ = link.forward(session_ids[k], steps[k], value[k], masks[k])
                    stage[k] += 1
                    continue
                if busy[i] and getattr(link, "one_at_a_time", False):
                    queued[i].append(k)
                else:
                    busy[i] += 1
                    pending.append((k, submit(session_ids[k], steps[k], value[k], masks[k])))
                return
            out[k] = value[k]
            following = None if then is None else then(k, value[k])
            if following is None:
                return
            stage[k], steps[k], value[k], masks[k] = 0, steps[k] + 1, following, None

    for k in range(n):
        advance(k)
    while pending:
        k, call = pending.popleft()
        value[k], _ = call.result()
        i = stage[k]
        busy[i] -= 1
        stage[k] += 1
        if queued[i]:
            advance(queued[i].popleft())  # keep that rank busy first
        advance(k)
    return out


class Cluster:
    """Rank 0's side of the cluster: a :class:`RankLink` per other rank, a heartbeat while idle,
    and the end: :meth:`close` stops every rank; :meth:`abort` makes them exit with an error.

    Used as a context manager, an exception that leaves the block aborts the other ranks with
    it (naming the rank that failed, for a :class:`NodeError` from a link). The heartbeat
    aborts the cluster when a ping finds a rank gone or a link has failed (even in a call whose
    error was swallowed above) and then calls ``on_failure`` from its thread (the launcher
    exits there: a server waiting for requests would not notice otherwise).
    """

    def __init__(
        self,
        groups: RankGroups,
        *,
        heartbeat: float | None = None,
        on_failure: Callable[[NodeError], None] | None = None,
    ) -> None:
        self.groups = groups
        self.links = [RankLink(r, groups) for r in range(1, groups.world_size)]
        self.period = groups.timeout / 3 if heartbeat is None else heartbeat
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._once = threading.Lock()
        self._aborted = False
        self._thread = threading.Thread(target=self._beat, name="rank-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.period / 2):
            for link in self.links:
                # a link may have failed in a call whose error a caller swallowed (a session
                # closing quietly): the cluster is broken all the same
                error = link.failed
                if (
                    error is None
                    and not link.busy
                    and time.monotonic() - link.last_used >= self.period
                ):
                    try:
                        link.ping()
                    except NodeError as exc:
                        error = exc
                    except SessionError:  # a worker refusing a ping: it is alive
                        pass
                if error is not None and not self._stop.is_set():
                    self.abort(error)
                    if self.on_failure is not None:
                        self.on_failure(error)
                    return

    def abort(self, error: BaseException) -> None:
        """Make every other live rank exit with ``error`` (naming the rank that failed); once."""
        with self._once:
            if self._aborted:
                return
            self._aborted = True
        self._stop.set()
        failed = 0
        if isinstance(error, NodeError) and error.node.startswith("rank "):
            failed = int(error.node.split()[1])
        reason = error.reason if isinstance(error, NodeError) and failed else str(error)
        reason = reason or type(error).__name__
        for link in self.links:
            if link.rank != failed:
                link.stop(Kind.ABORT, failed, reason)

    def close(self) -> None:
        """Stop the heartbeat and every rank's worker loop (they return from serve_rank)."""
        self._stop.set()
        for link in self.links:
            link.stop(Kind.STOP)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.groups.timeout)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.abort(exc)
            self._thread.join(timeout=self.groups.timeout)
        else:
            self.close()


# ---- ranks > 0: the worker loop ---------------------------------------------------------------


def serve_rank(link: PartLink, groups: RankGroups) -> None:
    """Run rank 0's calls on ``link`` (a LocalLink of this rank's part) until it says stop.

    Returns on ``STOP``. Raises :class:`NodeError` naming rank 0 when rank 0 is gone or silent
    past the timeout, and naming the failed rank when rank 0 aborts the cluster.
    """
    if groups.rank == 0:
        raise PartialRunError("serve_rank runs on ranks > 0; rank 0 drives them (Cluster)")
    wire = _Wire(groups, 0)
    log.info("rank %d: serving %s", groups.rank, getattr(link, "name", "a part"))
    unsent: deque[_Sent] = deque()  # replies not waited on (rank 0 may read them later)
    while True:
        try:
            header, payload, x, mask = wire.recv()
        except RuntimeError as exc:
            raise NodeError("rank 0", f"gone or silent: {_first_line(exc)}") from exc
        if header.kind == Kind.STOP:
            log.info("rank %d: stopped by rank 0", groups.rank)
            for sent in unsent:  # rank 0 read every reply before it said stop
                sent.wait()
            return
        if header.kind == Kind.ABORT:
            raise NodeError(f"rank {header.a}", payload.decode(errors="replace"))
        reply, body, tensors = _execute(link, header, payload, x, mask)
        try:
            unsent.append(wire.send(reply, body, tensors))
            while len(unsent) > _UNSENT_REPLIES:  # rank 0 reads replies in order
                unsent.popleft().wait()
        except RuntimeError as exc:
            raise NodeError("rank 0", f"gone: {_first_line(exc)}") from exc


def _execute(
    link: PartLink,
    header: Header,
    payload: bytes,
    x: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> tuple[Header, bytes, list[torch.Tensor]]:
    """Run one call on ``link``; the reply's header, byte payload and tensors. A session's
    id on the worker is its wire number as text."""
    sid = str(header.session)
    try:
        if header.kind == Kind.INFO:
            return Header(Kind.OK), json.dumps(link.info().to_dict()).encode(), []
        if header.kind == Kind.PING:
            return Header(Kind.OK), b"", []
        if header.kind == Kind.OPEN_SESSION:
            link.open_session(sid, header.a, header.b)
        elif header.kind == Kind.FORWARD:
            if x is None:
                raise PartialRunError("a FORWARD call came without its tensor")
            out, seconds = link.forward(sid, header.step, x, mask)
            head, tensors = _described(Kind.OK, out, nanos=int(seconds * 1e9))
            return head, b"", tensors
        elif header.kind == Kind.CLOSE_SESSION:
            link.close_session(sid)
        elif header.kind == Kind.KEEP_ROWS:
            link.keep_rows(sid, [int(r) for r in json.loads(payload.decode())])
        elif header.kind == Kind.JOIN:
            link.join(sid, str(header.a))
        else:
            raise PartialRunError(f"rank 0 sent a {header.kind.name} header as a call")
    except SessionError as exc:
        return _error(Status.REFUSED, str(exc))
    except Exception as exc:  # a worker reports, never dies of, a failing call
        log.exception("rank call %s failed", header.kind.name)
        return _error(Status.FAILED, f"{type(exc).__name__}: {exc}")
    return Header(Kind.OK), b"", []


def _error(status: Status, text: str) -> tuple[Header, bytes, list[torch.Tensor]]:
    return Header(Kind.ERROR, status=int(status)), text.encode(), []
