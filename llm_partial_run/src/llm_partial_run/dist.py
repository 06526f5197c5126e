"""Fixed clusters on torch.distributed: parts on ranks in a ring, driven from rank 0.

Every rank holds one part (rank 0 one or two). The ranks form a ring: rank r receives only from
rank r-1 and sends only to rank r+1 (the last rank to rank 0). Rank 0 sends a call to rank 1;
each rank runs it on a :class:`~llm_partial_run.local.LocalLink` of its part when it is one of
the call's ranks (``first..last``) and passes the result on, so a step's hidden states go rank
to rank along the chain and the last rank's output comes back to rank 0: N transfers for N
ranks (a star through rank 0 makes 2(N-1)). Rank 0 holds a :class:`RanksLink` -- a
:class:`~llm_partial_run.transport.PartLink` -- for consecutive ranks (:meth:`Cluster.chain`:
one for ranks 1..N-1 when the ranks hold the parts in chain order; when rank 0 holds the end
too, as the launcher's auto parts have it, that output is hidden states, not logits) and drives
the same :class:`~llm_partial_run.session.Session` as the socket pipeline, so the sampler, the
``generate`` CLI and the HTTP API run unchanged on top (:mod:`llm_partial_run.launch`).

The messages are :mod:`llm_partial_run.wire`'s. Each rank handles calls in the order they
come, so a call's result comes back to rank 0 in the order calls were sent: several may be in
flight at once (:meth:`RanksLink.submit_forward`, :func:`forward_in_flight`) and the ranks
compute different micro-batches at the same time. A rank that refuses a call (SessionError, or
any exception) marks it with an error status and the ranks after it pass it on untouched.

Faults: every receive waits at most ``timeout`` seconds; a peer that dies closes its gloo
connections and the waiting side fails at once. A rank that loses its predecessor sends an
``ABORT`` naming it on round the ring and exits; rank 0 raises
:class:`~llm_partial_run.errors.NodeError` naming the failed rank and sends ``ABORT`` round the
ring (:meth:`Cluster.abort`). While rank 0 is idle a heartbeat sends a ``PING`` round the ring
every ``timeout / 3`` seconds, so a rank's wait never times out on a healthy cluster and a rank
that dies between requests is noticed. Recovery is torchrun's: ``--max-restarts N`` restarts
the whole group, which reloads every part.
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
from typing import Any

import torch
import torch.distributed as dist

from llm_sepweight import PartSpec

from .errors import NodeError, PartialRunError, SessionError
from .transport import PartInfo, PartLink
from .wire import Header, Kind, Message, Pool, Receiver, Sender, Sent, Status, described

log = logging.getLogger(__name__)

_UNSENT = 4  # a rank waits on its oldest send beyond this many unwaited
_ABORT_WAIT = 5.0  # seconds a dying rank waits for its ABORT to be taken
IDLE_POST = 0.25
"""Seconds: rank 0 idle this long gets its next result's receive posted by the heartbeat (a
busy rank 0 posts it when it sends the next call), well within a dying rank's ABORT wait."""


@dataclass(frozen=True)
class RankGroups:
    """This process's place in the cluster: its rank, the groups the wire uses, its device, the
    seconds any receive may wait (``timeout``) and may busy-poll around a message's expected
    arrival (``spin``: :meth:`llm_partial_run.wire.Receiver.recv`)."""

    rank: int
    world_size: int
    device: torch.device
    headers: Any  # a gloo group: headers and byte payloads, CPU tensors
    data: Any  # hidden states: the same gloo group on CPU, an NCCL group on CUDA
    timeout: float
    spin: float = 0.0

    @property
    def on_cuda(self) -> bool:
        """True when hidden states travel over NCCL as device tensors."""
        return self.device.type == "cuda"

    @property
    def previous(self) -> int:
        """The rank this one receives from."""
        return (self.rank - 1) % self.world_size

    @property
    def next(self) -> int:
        """The rank this one sends to."""
        return (self.rank + 1) % self.world_size


def init_ranks(device: str = "cpu", *, timeout: float = 60.0, spin: float = 0.0) -> RankGroups:
    """Join the cluster torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``; ``LOCAL_RANK`` picks the GPU) and make the wire's groups.

    ``device``: ``"cpu"`` (gloo carries everything) or ``"cuda"`` (rank r uses ``cuda:LOCAL_RANK``;
    NCCL carries hidden states, a gloo group the headers). ``timeout``: seconds any call may wait
    for a peer before the cluster is declared broken; it must exceed the longest step of the
    whole chain (a call's result comes back after every rank has run it). ``spin``: seconds
    each receive may busy-poll around its message's expected arrival instead of sleeping
    (0: never; it saves a thread wake per transfer for CPU time, so give it only where every
    rank has a core to itself).
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
    if not isinstance(spin, (int, float)) or not 0 <= spin < timeout:
        raise PartialRunError(f"spin must be seconds >= 0 and below the timeout, got {spin!r}")
    span = datetime.timedelta(seconds=timeout)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PartialRunError("--device cuda but torch sees no CUDA device")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=span)
        headers = _gloo(dist.new_group(backend="gloo", timeout=span))
        data = dist.group.WORLD
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=span)
        headers = data = _gloo(dist.group.WORLD)
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("rank %d of %d on %s (timeout %.0f s)", rank, world, dev, timeout)
    return RankGroups(rank, world, dev, headers, data, float(timeout), float(spin))


def _gloo(group: Any) -> Any:
    """The gloo backend behind ``group``, whose send and receive the wire calls directly: the
    process group's own call goes through torch's dispatcher first, which cost 15-25 us more per
    send after a step's compute (cold caches; measured on SmolLM2's 2-rank decode). The group
    itself where this torch has no such accessor."""
    try:
        return group._get_backend(torch.device("cpu"))
    except (AttributeError, RuntimeError):
        return group


def close_ranks() -> None:
    """Leave the cluster (destroy the process groups); harmless when not in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- rank 0: the ring's two ends --------------------------------------------------------------


class PendingCall:
    """A call sent round the ring whose result has not been read yet; :meth:`result` reads it.

    Results come back in the order calls were sent, so ``result`` first waits for the results
    of the calls sent before this one to be read (by whichever thread holds them).
    """

    def __init__(self, ring: _Ring, ticket: int, kind: Kind, sent: Sent, name: str) -> None:
        self._ring, self._ticket, self.kind, self.name = ring, ticket, kind, name
        self._sent: Sent | None = sent  # the call as posted (its works hold its tensors)
        self._message: Message | None = None

    def message(self) -> Message:
        """The call as it came back (read once, then kept); NodeError when a rank failed,
        SessionError when a rank refused it."""
        if self._message is None:
            self._message = self._ring.read(self._ticket, self.kind, self._sent)
            self._sent = None
        header = self._message.header
        if header.status != Status.OK:  # the text names the rank that refused it
            raise SessionError(self._message.payload.decode(errors="replace"))
        return self._message

    def result(self) -> tuple[torch.Tensor, float]:
        """A forward call's output and the seconds the ranks computed."""
        message = self.message()
        if message.x is None:
            raise NodeError(self.name, f"a {self.kind.name} result carried no tensor")
        return message.x, message.header.nanos / 1e9


class _Ring:
    """Rank 0's ends of the ring: calls go to rank 1, results come from the last rank, in order.

    Thread-safe: calls from several threads are sent whole, one at a time, and their results
    read in the same order. The first transport failure breaks the ring for good (``failed``).
    """

    def __init__(self, groups: RankGroups) -> None:
        if groups.rank != 0 or groups.world_size < 2:
            raise PartialRunError(
                f"rank 0 of at least 2 ranks drives the ring; this is rank {groups.rank} of "
                f"{groups.world_size}"
            )
        self.groups = groups
        pool = Pool()
        self.sender = Sender(groups, groups.next, pool)
        self.receiver = Receiver(groups, groups.previous, pool)
        self.receiver.post()  # the first result's receive (see read() for the next ones)
        self._send_lock = threading.Lock()
        self._turn = threading.Condition()
        self._sent = 0  # tickets handed out
        self._read = 0  # results read
        self.numbers = itertools.count(1)
        """Session numbers on the wire (one counter: links over the same ranks never share)."""
        self.one_at_a_time = groups.on_cuda and groups.world_size == 2
        """True over NCCL with 2 ranks: a forward is sent only once every earlier call's result
        was read. NCCL runs a pair's sends and receives in one stream, in the order they were
        issued, so rank 0 sending k+1 before receiving k while rank 1 sends k before receiving
        k+1 could wait on each other. Round a ring of 3 or more ranks each pair carries one
        direction only; gloo matches sends and receives independently."""
        self.failed: NodeError | None = None  # the transport broke
        self.stopped: NodeError | None = None  # rank 0 sent STOP or ABORT
        self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        """True while a call's result has not been read."""
        return self._read < self._sent

    def call(self, header: Header, payload: bytes, tensors: Sequence[torch.Tensor],
             name: str) -> PendingCall:  # fmt: skip
        """Send a call round the ring; its result is read later (:meth:`PendingCall.message`)."""
        with self._send_lock:
            if self.one_at_a_time and tensors:
                self._wait_idle(header.kind)
            if self.failed is not None or self.stopped is not None:
                raise self.failed or self.stopped
            try:
                if self._sent > self._read:  # in flight: the ranks post their receives early
                    header = header._replace(ahead=self._sent - self._read)
                sent = self.sender.send(header, payload, tensors)
            except RuntimeError as exc:
                raise self.fail(
                    1, f"sending {header.kind.name} failed: {_first_line(exc)}"
                ) from exc
            self._post(header.kind.name)  # its result's, while the ranks compute (off the path)
            ticket = self._sent
            self._sent += 1
            self.last_used = time.monotonic()
        return PendingCall(self, ticket, header.kind, sent, name)

    def read(self, ticket: int, kind: Kind, sent: Sent) -> Message:
        """The result of call ``ticket`` (after the earlier ones were read)."""
        with self._turn:
            self._turn.wait_for(lambda: self._read == ticket or self.failed is not None)
            if self.failed is not None:
                raise self.failed
            # the next result's receive: at once while more calls are in flight, else when
            # the next call is sent (posting costs ~60 us that rank 0's next step would wait
            # on) or, idle, by the heartbeat (an ABORT from the last rank must get through)
            in_flight = self._read + 1 < self._sent
            try:
                message = self.receiver.recv(post_next=in_flight)
            except RuntimeError as exc:
                last = self.groups.previous
                raise self.fail(last, f"no answer to {kind.name}: {_first_line(exc)}") from exc
            finally:
                self._read += 1
                self.last_used = time.monotonic()
                self._turn.notify_all()
        if message.header.kind == Kind.ABORT:  # a rank lost its predecessor
            raise self.fail(message.header.a, message.payload.decode(errors="replace"))
        if message.header.kind != kind:
            raise self.fail(
                self.groups.previous, f"answered {kind.name} with {message.header.kind.name}"
            )
        try:
            sent.wait()  # done at once: the call went round the ring
        except RuntimeError as exc:
            raise self.fail(1, f"gone: {_first_line(exc)}") from exc
        return message

    def stop(self, kind: Kind, failed_rank: int = 0, reason: str = "") -> None:
        """Send ``STOP`` (every rank returns from serve_rank; waited until it came back round)
        or ``ABORT`` naming ``failed_rank`` (every rank exits with that error). Best effort:
        ranks already gone are ignored; once."""
        with self._send_lock:
            if self.failed is not None and kind == Kind.STOP or self.stopped is not None:
                return
            self.stopped = NodeError("rank 0", f"the cluster was stopped ({kind.name})")
            header = Header(kind, a=failed_rank, b=0, first=1, last=self.groups.world_size - 1)
            wait = min(self.groups.timeout, 10.0)
            try:
                sent = self.sender.send(header, reason.encode())
                sent.wait(wait)
                if kind == Kind.STOP and self.failed is None and not self.busy:
                    # back round: every rank has stopped (no receive left posted after it)
                    self.receiver.recv(timeout=wait, post_next=False)
            except (RuntimeError, PartialRunError) as exc:
                log.debug("%s not delivered round the ring: %s", kind.name, exc)

    def post_idle(self) -> None:
        """Post the next result's receive if a read left it unposted (the heartbeat's job,
        once rank 0 has idled :data:`IDLE_POST` seconds; a busy rank 0 posts it with its next
        call)."""
        with self._send_lock:
            if not self.receiver.posted and self.failed is None and self.stopped is None:
                try:
                    self._post("the next call")
                except NodeError:
                    pass  # the heartbeat finds the ring failed

    def _post(self, what: str) -> None:
        """Post the next result's receive; NodeError naming the last rank when it is gone
        (posting to a closed connection fails at once)."""
        try:
            self.receiver.post()
        except RuntimeError as exc:
            raise self.fail(
                self.groups.previous, f"gone before answering {what}: {_first_line(exc)}"
            ) from exc

    def _wait_idle(self, kind: Kind) -> None:
        with self._turn:
            done = lambda: self._read == self._sent or self.failed is not None  # noqa: E731
            if not self._turn.wait_for(done, timeout=self.groups.timeout):
                raise PartialRunError(
                    f"{kind.name} waited {self.groups.timeout} s for the previous call's result "
                    "to be read: over NCCL the ring takes one forward at a time (read the last "
                    "result first; forward_in_flight does)"
                )

    def fail(self, rank: int, reason: str) -> NodeError:
        """Break the ring with a NodeError naming ``rank`` (the first failure wins)."""
        if self.failed is None:
            self.failed = NodeError(f"rank {rank}", reason)
            log.error("%s", self.failed)
        with self._turn:
            self._turn.notify_all()
        return self.failed


class RanksLink:
    """A :class:`~llm_partial_run.transport.PartLink` to the parts on ranks ``first..last``
    (consecutive, in chain order) as one part: a forward runs on each in turn, the hidden
    states going rank to rank, never back through rank 0.

    Its :meth:`info` is the union of the ranks' parts (``"10-30 e"`` for ``"10-20"`` and
    ``"20-30 e"``); its errors name the rank that failed (``NodeError("rank 2", ...)``).
    Session ids (strings) become numbers on the wire, assigned here. Thread-safe.
    """

    def __init__(self, ring: _Ring, first: int, last: int) -> None:
        world = ring.groups.world_size
        if not 0 < first <= last < world:
            raise PartialRunError(f"a RanksLink covers ranks within 1..{world - 1}, "
                                  f"got {first}..{last}")  # fmt: skip
        self.ring, self.first, self.last = ring, first, last
        self.name = f"rank {first}" if first == last else f"ranks {first}-{last}"
        self._numbers: dict[str, int] = {}
        self._infos: list[PartInfo] | None = None

    def __repr__(self) -> str:
        return f"RanksLink({self.first}, {self.last})"

    @property
    def one_at_a_time(self) -> bool:
        """True over NCCL with 2 ranks (see :attr:`_Ring.one_at_a_time`)."""
        return self.ring.one_at_a_time

    @property
    def failed(self) -> NodeError | None:
        """The error that broke the ring (then every call raises it), or None."""
        return self.ring.failed

    # ---- PartLink ---------------------------------------------------------------------------

    def info(self) -> PartInfo:
        """The ranks' parts as one: their union spec; the rest from the first rank's part."""
        infos = self.rank_infos()
        if len(infos) == 1:
            return infos[0]
        specs = [PartSpec.parse(i.spec).resolve(i.num_layers) for i in infos]
        stops = [s.layers for s in specs if len(s.layers)]
        layers = range(stops[0].start, stops[-1].stop) if stops else range(0)
        union = PartSpec(begin=specs[0].begin, layers=layers, end=specs[-1].end)
        devices = sorted({i.device for i in infos})
        return replace(infos[0], spec=str(union), device=",".join(devices))

    def rank_infos(self) -> list[PartInfo]:
        """Each rank's part (asked once, round the ring)."""
        if self._infos is None:
            message = self._call(Kind.INFO, payload=b"[]").message()
            self._infos = [PartInfo.from_dict(d) for d in json.loads(message.payload)]
        return self._infos

    def open_session(self, session_id: str, batch_size: int, max_len: int) -> None:
        """Open the session on every rank of the link (all or none)."""
        number = self._numbers.get(session_id)
        if number is None:
            number = self._numbers[session_id] = next(self.ring.numbers)
        try:
            self._call(Kind.OPEN_SESSION, session=number, a=batch_size, b=max_len).message()
        except SessionError:  # a later rank refused: the earlier ones close it again
            if self._numbers.get(session_id) == number:
                del self._numbers[session_id]
            self._call(Kind.CLOSE_SESSION, session=number).message()
            raise

    def forward(
        self, session_id: str, step: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]:
        """Run a step on every rank of the link in turn; returns the last one's output (on this
        rank's device) and the ranks' summed compute seconds."""
        return self.submit_forward(session_id, step, x, mask).result()

    def submit_forward(
        self, session_id: str, step: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> PendingCall:
        """Send a step and return at once; ``.result()`` later gives what :meth:`forward` does."""
        device = self.ring.groups.device  # (a .to() that moves nothing is still a torch call)
        if x.device != device:
            x = x.to(device)
        if mask is not None and mask.device != device:
            mask = mask.to(device)
        number = self._number(session_id)
        return self._call(Kind.FORWARD, x, mask, session=number, step=step)

    def close_session(self, session_id: str) -> None:
        """Free the session on every rank of the link; unknown ids are ignored."""
        number = self._numbers.pop(session_id, None)
        if number is not None:
            self._call(Kind.CLOSE_SESSION, session=number).message()

    def keep_rows(self, session_id: str, rows: list[int]) -> None:
        """Keep only these rows of the session's batch, in this order."""
        if not isinstance(rows, (list, tuple)) or not all(isinstance(r, int) for r in rows):
            raise SessionError(f"rows must be a list of ints, got {rows!r}")
        payload = json.dumps(list(rows)).encode()
        self._call(Kind.KEEP_ROWS, session=self._number(session_id), payload=payload).message()

    def join(self, session_id: str, other_session_id: str) -> None:
        """Append the other session's rows to this one on every rank; the other is closed."""
        number, other = self._number(session_id), self._number(other_session_id)
        self._call(Kind.JOIN, session=number, a=other).message()
        self._numbers.pop(other_session_id, None)

    def close(self) -> None:
        """Nothing to release per link (the cluster's :meth:`Cluster.close` stops the ranks)."""

    # ---- beyond PartLink --------------------------------------------------------------------

    def ping(self) -> None:
        """A trip round the ring that keeps the ranks' waits alive and checks they are there."""
        self._call(Kind.PING).message()

    def rank_stats(self) -> list[dict]:
        """Each rank's wire counters: messages received from its predecessor and sent to its
        successor, those it caught polling (``spin``), calls it ran and calls it passed on."""
        return json.loads(self._call(Kind.STATS, payload=b"[]").message().payload)

    def _number(self, session_id: str) -> int:
        number = self._numbers.get(session_id)
        if number is None:
            raise SessionError(f"{self.name}: no open session {session_id!r}")
        return number

    def _call(self, kind: Kind, x: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              *, payload: bytes = b"", **fields: Any) -> PendingCall:  # fmt: skip
        header, tensors = described(kind, x, mask, first=self.first, last=self.last, **fields)
        return self.ring.call(header, payload, tensors, self.name)


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

    A :class:`RanksLink` is sent the next micro-batch before the previous one's result is back,
    so while rank 2 computes micro-batch k, rank 1 computes k+1 and this process k+2 on its own
    part (over NCCL a link is sent its next micro-batch once its last result is read:
    :attr:`RanksLink.one_at_a_time`). Links without ``submit_forward`` (a LocalLink) run in this
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
            advance(queued[i].popleft())  # keep that link busy first
        advance(k)
    return out


class Cluster:
    """Rank 0's side of the cluster: the ring, a :class:`RanksLink` per other rank (``links``)
    or for runs of consecutive ranks (:meth:`chain`, :meth:`link`), a heartbeat while idle, and
    the end: :meth:`close` stops every rank; :meth:`abort` makes them exit with an error.

    Used as a context manager, an exception that leaves the block aborts the other ranks with
    it (naming the rank that failed, for a :class:`NodeError` from a link). The heartbeat
    aborts the cluster when a ping finds a rank gone or the ring has failed (even in a call
    whose error was swallowed above) and then calls ``on_failure`` from its thread (the launcher
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
        alone = groups.world_size == 1  # torchrun --nproc-per-node 1: rank 0 holds the model
        self.ring = None if alone else _Ring(groups)
        self.links = [RanksLink(self.ring, r, r) for r in range(1, groups.world_size)]
        """One link per rank 1..N-1 (a call to rank r still goes round the whole ring)."""
        self.everyone = None if alone else self.link(1, groups.world_size - 1)
        self.period = groups.timeout / 3 if heartbeat is None else heartbeat
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._once = threading.Lock()
        self._aborted = False
        self._thread = threading.Thread(target=self._beat, name="rank-heartbeat", daemon=True)
        self._thread.start()

    def link(self, first: int, last: int) -> RanksLink:
        """A link over the consecutive ranks ``first..last`` as one part."""
        return RanksLink(self.ring, first, last)

    def chain(self, own: PartLink | Sequence[PartLink]) -> list[PartLink]:
        """The links of a pipeline over ``own`` (rank 0's part, or its parts) and every rank's
        part: the parts in chain order (checked: ChainError names the rank), with each run of
        ranks that follow one another both in the chain and round the ring made one
        :class:`RanksLink`. With rank r holding the r-th part that is ``[own, ranks 1..N-1]``:
        a step's hidden states go rank to rank; with rank 0 holding begin and end too
        (``[begin part, ranks 1..N-1, end part]``) the ring's last transfer carries hidden
        states back to rank 0, never logits."""
        from .chain import check_chain

        owns = [own] if not isinstance(own, Sequence) else list(own)
        if self.everyone is None:
            return check_chain([(link, link.info()) for link in owns]).links
        infos = self.everyone.rank_infos()
        mine = [(link, link.info()) for link in owns]
        order = check_chain([*mine, *zip(self.links, infos, strict=True)]).links
        merged: list[PartLink] = []
        for link in order:
            before = merged[-1] if merged else None
            if (
                isinstance(link, RanksLink)
                and isinstance(before, RanksLink)
                and (before.last + 1 == link.first)
            ):
                merged[-1] = self.link(before.first, link.last)
            else:
                merged.append(link)
        return merged

    def stats(self) -> list[dict]:
        """Every rank's wire counters (:meth:`RanksLink.rank_stats`), rank 1 first."""
        return [] if self.everyone is None else self.everyone.rank_stats()

    def _beat(self) -> None:
        ring = self.ring
        while ring is not None and not self._stop.wait(min(self.period / 2, IDLE_POST)):
            if not ring.busy and time.monotonic() - ring.last_used >= IDLE_POST:
                ring.post_idle()
            # the ring may have failed in a call whose error a caller swallowed (a session
            # closing quietly): the cluster is broken all the same
            error = ring.failed
            if error is None and not ring.busy and time.monotonic() - ring.last_used >= self.period:
                try:
                    self.everyone.ping()
                except NodeError as exc:
                    error = exc
                except SessionError:  # a rank refusing a ping: it is alive
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
        if isinstance(error, NodeError) and error.node.split()[-1].isdigit():
            failed = int(error.node.split()[-1])  # "rank 2" (a link's "ranks 1-2" names none)
        reason = error.reason if isinstance(error, NodeError) and failed else str(error)
        if self.ring is not None:
            self.ring.stop(Kind.ABORT, failed, reason or type(error).__name__)

    def close(self) -> None:
        """Stop the heartbeat and every rank's worker loop (they return from serve_rank)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.groups.timeout)
        if self.ring is not None:
            self.ring.stop(Kind.STOP)

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
    """Run the calls coming round the ring on ``link`` (a LocalLink of this rank's part) and
    pass each on to the next rank, until rank 0 says stop.

    Returns on ``STOP``. Raises :class:`NodeError` naming the previous rank when it is gone or
    silent past the timeout (after sending an ``ABORT`` naming it on round the ring), and naming
    the failed rank when an ``ABORT`` comes round.
    """
    if groups.rank == 0:
        raise PartialRunError("serve_rank runs on ranks > 0; rank 0 drives them (Cluster)")
    rank, previous = groups.rank, groups.previous
    pool = Pool()
    inbox, outbox = Receiver(groups, previous, pool), Sender(groups, groups.next, pool)
    counts = {"rank": rank, "from": previous, "to": groups.next, "received": 0, "sent": 0,
              "caught": 0, "ran": 0, "passed": 0}  # fmt: skip
    log.info("rank %d: serving %s", rank, getattr(link, "name", "a part"))
    unsent: deque[Sent] = deque()  # sends not waited on yet (the next rank takes them in order)
    while True:
        try:
            # the next receive is posted at once only when rank 0 has more calls in flight; else
            # when this call has been passed on (the loop's next recv): posting sends the
            # previous rank a "ready" that wakes its IO thread, and a step waits on none of it
            message = inbox.recv(post_next=False)
            if message.header.ahead:
                inbox.post()
        except RuntimeError as exc:
            error = NodeError(f"rank {previous}", f"gone or silent: {_first_line(exc)}")
            _pass_abort(outbox, Header(Kind.ABORT, a=previous, b=rank), error.reason)
            raise error from exc
        header = message.header
        if header.kind == Kind.ABORT:
            if groups.next != header.b:  # not back where it started
                _pass_abort(outbox, header, message.payload.decode(errors="replace"))
            raise NodeError(f"rank {header.a}", message.payload.decode(errors="replace"))
        counts["received"], counts["sent"], counts["caught"] = (
            inbox.received, outbox.sent, inbox.caught)  # fmt: skip
        if header.first <= rank <= header.last and header.kind != Kind.STOP:
            counts["ran"] += 1
            header, payload, tensors = _execute(link, message, rank, counts)
        else:
            counts["passed"] += 1
            payload = message.payload
            tensors = [t for t in (message.x, message.mask) if t is not None]
        try:
            unsent.append(outbox.send(header, payload, tensors))
            if header.kind == Kind.STOP:
                log.info("rank %d: stopped by rank 0", rank)
                for sent in unsent:
                    sent.wait(min(groups.timeout, _ABORT_WAIT))
                return
            while len(unsent) > _UNSENT:
                unsent.popleft().wait()
        except RuntimeError as exc:
            raise NodeError(f"rank {groups.next}", f"gone: {_first_line(exc)}") from exc


def _pass_abort(outbox: Sender, header: Header, reason: str) -> None:
    """Send an ABORT on to the next rank, waiting a little for it to be taken; best effort."""
    try:
        outbox.send(header, reason.encode()).wait(_ABORT_WAIT)
    except (RuntimeError, PartialRunError) as exc:
        log.debug("ABORT not passed on: %s", exc)


def _execute(
    link: PartLink, message: Message, rank: int, counts: dict
) -> tuple[Header, bytes, list[torch.Tensor]]:
    """Run one call on ``link`` (unless an earlier rank refused it); the header, byte payload
    and tensors to pass on. A session's id on a rank is its wire number as text."""
    header, payload = message.header, message.payload
    tensors = [t for t in (message.x, message.mask) if t is not None]
    refused = header.status != Status.OK
    if refused and header.kind != Kind.CLOSE_SESSION:  # closing goes on everywhere
        return header, payload, tensors
    sid = str(header.session)
    try:
        if header.kind in (Kind.INFO, Kind.STATS):
            found = json.loads(payload)
            if header.kind == Kind.INFO:
                found.append(link.info().to_dict())
            else:
                found.append({**counts, **getattr(link, "stats", dict)()})
            return header, json.dumps(found).encode(), []
        if header.kind == Kind.FORWARD:
            if message.x is None:
                raise PartialRunError("a FORWARD call came without its tensor")
            out, seconds = link.forward(sid, header.step, message.x, message.mask)
            nanos = header.nanos + int(seconds * 1e9)
            mask = message.mask if rank < header.last else None  # the next part needs it
            head = Header(Kind.FORWARD, header.session, header.step, first=header.first,
                          last=header.last, x_dtype=out.dtype, x_shape=tuple(out.shape),
                          mask=mask is not None, nanos=nanos, hops=header.hops,
                          ahead=header.ahead)  # fmt: skip
            return head, b"", [out] if mask is None else [out, mask]
        if header.kind == Kind.OPEN_SESSION:
            link.open_session(sid, header.a, header.b)
        elif header.kind == Kind.CLOSE_SESSION:
            link.close_session(sid)
        elif header.kind == Kind.KEEP_ROWS:
            link.keep_rows(sid, [int(r) for r in json.loads(payload.decode())])
        elif header.kind == Kind.JOIN:
            link.join(sid, str(header.a))
        elif header.kind != Kind.PING:
            raise PartialRunError(f"a {header.kind.name} header came as a call")
    except SessionError as exc:
        return _refused(header, Status.REFUSED, str(exc), refused, payload)
    except Exception as exc:  # a rank reports, never dies of, a failing call
        log.exception("rank call %s failed", header.kind.name)
        text = f"rank {rank} refused {header.kind.name}: {type(exc).__name__}: {exc}"
        return _refused(header, Status.FAILED, text, refused, payload)
    return header, payload, tensors


def _refused(header: Header, status: Status, text: str, already: bool,
             payload: bytes) -> tuple[Header, bytes, list[torch.Tensor]]:  # fmt: skip
    if already:  # the first refusal is the one rank 0 hears of
        return header, payload, []
    bare = header._replace(status=int(status), x_dtype=None, x_shape=(), mask=False)
    return bare, text.encode(), []
