"""torch.distributed as a transport: the wire, the worker loop, RankLink, faults, and whole models.

Ranks are real processes on 127.0.0.1 (gloo), started the way a user would: ``torchrun -m
llm_partial_run.launch`` for the models; this file run as a script under the env:// rendezvous
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) for the transport on fake parts and
for the faults (torchrun would itself kill the group when a rank dies; these tests check that
the ranks end on their own). Each launch imports torch in three processes, so a launch is shared
by the tests of one scenario.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm_partial_run.errors import ChainError, PartialRunError
from llm_partial_run.launch import auto_parts, plan_parts
from llm_partial_run.wire import DTYPES, HEADER_BYTES, MAGIC, Header, Kind, Status
from llm_sepweight import Manifest

HERE = Path(__file__).resolve()
TORCHRUN = Path(sys.executable).parent / "torchrun"
LAUNCH_TIMEOUT = 240.0
FAULT_TIMEOUT = 20.0  # the ranks' --timeout in the fault tests
CALLS_TIMEOUT = 6.0  # in the calls scenario, which idles past it once
SPIN, SPIN_PACE, SPIN_STEPS = 0.02, 0.03, 12  # the spin scenario: polls of 20 ms, every 30 ms


# ---- the header protocol (no processes) -----------------------------------------------------


def test_header_round_trips_every_field():
    header = Header(Kind.FORWARD, session=7, step=3, a=2, b=64, first=1, last=2,
                    x_dtype=torch.bfloat16, x_shape=(2, 5, 576), mask=True, nbytes=11,
                    nanos=12345, status=Status.REFUSED, inline=True, hops=3,
                    ahead=2)  # fmt: skip
    raw = header.to_bytes()
    assert len(raw) == HEADER_BYTES and int.from_bytes(raw[:8], "little") == MAGIC
    assert Header.unpack_from(raw) == header
    buffer = bytearray(HEADER_BYTES + 5)
    header.pack_into(buffer, 5)
    assert Header.unpack_from(buffer, 5) == header


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d is not None])
def test_header_carries_every_dtype(dtype):
    header = Header(Kind.FORWARD, x_dtype=dtype, x_shape=(1, 2, 3))
    assert Header.unpack_from(header.to_bytes()).x_dtype == dtype


def test_a_foreign_header_is_refused_with_the_reason():
    bad = bytearray(Header(Kind.PING).to_bytes())
    bad[0:8] = (0x4C4D_5052_0000_0001).to_bytes(8, "little")  # wire version 1
    with pytest.raises(PartialRunError, match="not llm_partial_run wire version 3"):
        Header.unpack_from(bad)
    bad = bytearray(Header(Kind.PING).to_bytes())
    bad[8] = 55  # no such kind
    with pytest.raises(PartialRunError, match="malformed header"):
        Header.unpack_from(bad)
    with pytest.raises(PartialRunError, match=f"a header is {HEADER_BYTES} bytes, got 3"):
        Header.unpack_from(b"abc")


def test_a_tensor_the_header_cannot_describe_is_refused():
    with pytest.raises(PartialRunError, match="at most 4"):
        Header(Kind.FORWARD, x_dtype=torch.float32, x_shape=(1, 1, 1, 1, 1)).to_bytes()
    with pytest.raises(PartialRunError, match="cannot be sent"):
        Header(Kind.FORWARD, x_dtype=torch.complex64, x_shape=(1,)).to_bytes()


class _FakeGroup:
    """A process group in one process: ``send`` queues a copy of the bytes per tag, a receive's
    ``wait`` takes the oldest (so receives may be posted before their message is sent)."""

    def __init__(self) -> None:
        from collections import defaultdict, deque

        self.queues = defaultdict(deque)
        self.sends: list[tuple[int, int]] = []  # (tag, bytes) of every message

    def send(self, tensors, peer, tag):
        data = tensors[0].contiguous().view(-1).view(torch.uint8).clone()
        self.queues[tag].append(data)
        self.sends.append((tag, data.numel()))
        return SimpleNamespace(wait=lambda span=None: True)

    def recv(self, tensors, peer, tag):
        def wait(span=None):
            data = self.queues[tag].popleft()
            tensors[0].view(-1).view(torch.uint8)[: data.numel()].copy_(data)
            return True

        return SimpleNamespace(wait=wait)


@pytest.mark.parametrize("on_cuda", [False, True])
def test_messages_round_trip_one_buffer_when_small_in_pieces_when_large(on_cuda):
    from llm_partial_run.wire import BULK_TAG, HEAD_TAG, INLINE_BYTES, Receiver, Sender, described

    headers = _FakeGroup()
    data = headers if not on_cuda else _FakeGroup()  # on CUDA: tensors on the NCCL group
    groups = SimpleNamespace(headers=headers, data=data, on_cuda=on_cuda,
                             device=torch.device("cpu"), timeout=5.0)  # fmt: skip
    sender, receiver = Sender(groups, 1), Receiver(groups, 0)
    receiver.post()  # posted ahead, as the ranks do
    small = torch.randn(2, 3, 8)[:, :, ::2]  # not contiguous
    large = torch.randn(2, INLINE_BYTES // 8, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for x, m, payload in [(small, mask, b"[1, 2]"), (large, None, b"text"), (None, None, b"")]:
        header, tensors = described(Kind.FORWARD, x, m, session=4, step=2, first=1, last=3)
        sender.send(header, payload, tensors).wait()
        got = receiver.recv()
        assert (got.header.session, got.header.step, got.header.hops) == (4, 2, 1)
        assert got.payload == payload
        assert got.x is None if x is None else torch.equal(got.x, x)
        assert got.mask is None if m is None else torch.equal(got.mask, m)
    big = large.numel() * 8
    if on_cuda:  # header and payload in one message on gloo, every tensor on NCCL
        assert headers.sends == [(HEAD_TAG, HEADER_BYTES + 6), (HEAD_TAG, HEADER_BYTES + 4),
                                 (HEAD_TAG, HEADER_BYTES)]  # fmt: skip
        assert data.sends == [(BULK_TAG, small.numel() * 4), (BULK_TAG, 6), (BULK_TAG, big)]
    else:  # one message when it fits, else the header, then the payload and tensor apart
        assert headers.sends == [
            (HEAD_TAG, HEADER_BYTES + 6 + small.numel() * 4 + mask.numel()),
            (HEAD_TAG, HEADER_BYTES), (BULK_TAG, 4), (BULK_TAG, big),
            (HEAD_TAG, HEADER_BYTES),
        ]  # fmt: skip


def test_a_message_that_came_before_its_peer_left_is_still_read():
    # the peer sends its last message (an ABORT) and exits: posting the next receive fails,
    # but the message that came is returned, and the next recv raises
    from llm_partial_run.wire import Receiver, Sender, described

    class _Closing(_FakeGroup):
        def recv(self, tensors, peer, tag):
            if not self.queues[tag]:
                raise RuntimeError("Connection closed by peer")
            return super().recv(tensors, peer, tag)

    group = _Closing()
    groups = SimpleNamespace(headers=group, data=group, on_cuda=False,
                             device=torch.device("cpu"), timeout=5.0)  # fmt: skip
    header, _ = described(Kind.ABORT, a=2, b=3)
    Sender(groups, 0).send(header, b"rank 2 is gone")
    receiver = Receiver(groups, 3)
    got = receiver.recv()  # posts the next receive, which fails
    assert (got.header.kind, got.header.a, got.payload) == (Kind.ABORT, 2, b"rank 2 is gone")
    with pytest.raises(RuntimeError, match="closed by peer"):
        receiver.recv()


class _TimedGroup:
    """Receives that complete on a schedule: the i-th receive posted gets ``messages[i]``
    ``delays[i]`` seconds after its posting, written by a thread (its first byte last)."""

    def __init__(self, messages, delays) -> None:
        from collections import deque

        self.messages, self.delays = deque(messages), deque(delays)

    def recv(self, tensors, peer, tag):
        import threading

        data, delay, target = self.messages.popleft(), self.delays.popleft(), tensors[0]

        def land():
            time.sleep(delay)
            target[1 : data.numel()].copy_(data[1:])
            target[0] = data[0]

        thread = threading.Thread(target=land)
        thread.start()
        return SimpleNamespace(wait=lambda span=None: thread.join() or True)


def test_a_receive_polls_only_for_messages_that_come_at_a_steady_pace():
    from llm_partial_run.wire import HEAD_TAG, Receiver, Sender, described

    cpu = torch.device("cpu")
    plain = _FakeGroup()
    sender = Sender(SimpleNamespace(headers=plain, data=plain, on_cuda=False, device=cpu,
                                    timeout=5.0), 1)  # fmt: skip
    xs = [torch.full((1, 1, 4), float(step)) for step in range(6)]
    for step, x in enumerate(xs):
        header, tensors = described(Kind.FORWARD, x, session=1, step=step)
        sender.send(header, b"", tensors)
    delays = [0.03, 0.03, 0.03, 0.03, 0.3, 0.03]
    timed = _TimedGroup(plain.queues[HEAD_TAG], delays)
    groups = SimpleNamespace(headers=timed, data=timed, on_cuda=False, device=cpu, timeout=5.0,
                             spin=0.02)  # fmt: skip
    receiver, caught = Receiver(groups, 0), []
    for step, x in enumerate(xs):
        message = receiver.recv(post_next=False)
        assert message.header.step == step and torch.equal(message.x, x)
        caught.append(receiver.caught)
    # two arrivals set the pace, the next two are caught polling, the late one is slept on
    # (gloo's wait), and after it the pace is not steady: the last is slept on too
    assert caught == [0, 0, 1, 2, 2, 2]


class _PeerGroup(_FakeGroup):
    """A fake group with a queue per peer and tag that logs, in order, each receive posted and
    each message sent (one rank's traffic, in one process)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def send(self, tensors, peer, tag):
        self.events.append(f"send to {peer}")
        return super().send(tensors, peer, (peer, tag))

    def recv(self, tensors, peer, tag):
        self.events.append(f"post from {peer}")
        return super().recv(tensors, peer, (peer, tag))


def test_a_rank_posts_its_next_receive_early_only_while_calls_are_in_flight():
    # posting a receive wakes the sender's IO thread: a rank posts the next one once it has
    # passed the current call on, unless rank 0 said more calls are right behind it (ahead)
    from llm_partial_run.dist import serve_rank
    from llm_partial_run.local import LocalLink, part_info
    from llm_partial_run.wire import HEAD_TAG, Sender, described

    group = _PeerGroup()
    groups = SimpleNamespace(rank=1, world_size=3, previous=0, next=2, headers=group, data=group,
                             on_cuda=False, device=torch.device("cpu"), timeout=5.0)  # fmt: skip
    rank0 = Sender(groups, 0)  # queues what rank 1 will receive from rank 0
    x = torch.ones(1, 1, 4)
    calls = [described(Kind.OPEN_SESSION, session=1, a=1, b=8, first=1, last=1),
             described(Kind.FORWARD, x, session=1, step=0, first=1, last=1),
             described(Kind.FORWARD, x, session=1, step=1, first=1, last=1, ahead=1),
             described(Kind.STOP, first=1, last=2)]  # fmt: skip
    for header, tensors in calls:
        rank0.send(header, b"", tensors)
    group.events.clear()
    part = FakePart(1)
    serve_rank(LocalLink(part, info=part_info(part, arch="fake"), name="rank 1"), groups)
    assert group.events == ["post from 0", "send to 2",  # OPEN_SESSION, nothing ahead
                            "post from 0", "send to 2",  # step 0, nothing ahead
                            "post from 0", "post from 0", "send to 2",  # step 1, one ahead
                            "send to 2"]  # fmt: skip  # STOP: passed on, nothing posted after
    out = [group.queues[(2, HEAD_TAG)][i] for i in (1, 2)]  # the steps, passed on to rank 2
    got = [Header.unpack_from(bytes(o[:HEADER_BYTES].tolist())) for o in out]
    assert [(h.kind, h.step, h.ahead) for h in got] == [(Kind.FORWARD, 0, 0), (Kind.FORWARD, 1, 1)]


def test_rank_zero_posts_a_results_receive_when_it_sends_the_call_or_when_idle():
    # posting costs rank 0 ~60 us: not between a result and its next step (the path a token
    # waits on) but after sending the next call, while the ranks compute; at once only while
    # more calls are in flight; idle, the heartbeat posts it (an ABORT must get through)
    from llm_partial_run.dist import RankGroups, _Ring

    group = _PeerGroup()  # rank 0 of 2: sends to rank 1 and reads them back as results
    ring = _Ring(RankGroups(0, 2, torch.device("cpu"), group, group, 5.0))
    ping = Header(Kind.PING, first=1, last=1)
    assert group.events == ["post from 1"]  # the first result's
    ring.call(ping, b"", [], "rank 1").message()
    assert group.events[1:] == ["send to 1"] and not ring.receiver.posted  # nothing in flight
    first, second = (ring.call(ping, b"", [], "rank 1") for _ in range(2))
    assert group.events[2:] == ["send to 1", "post from 1", "send to 1"]  # posted once
    first.message()
    assert group.events[5:] == ["post from 1"] and ring.receiver.posted  # the second's, at once
    second.message()
    assert group.events[6:] == [] and not ring.receiver.posted
    ring.post_idle()  # the heartbeat, once rank 0 has idled
    ring.post_idle()
    assert group.events[6:] == ["post from 1"] and ring.receiver.posted


def test_a_receive_makes_the_next_messages_tensor_when_it_posts_it():
    # a torch.empty right after a step's compute costs ~45 us (cold caches): a decode step's
    # tensor has the same shape each time, so the receive makes it when posted, off the path
    from llm_partial_run.wire import Receiver, Sender, described

    group = _FakeGroup()
    groups = SimpleNamespace(headers=group, data=group, on_cuda=False,
                             device=torch.device("cpu"), timeout=5.0)  # fmt: skip
    sender, receiver = Sender(groups, 1), Receiver(groups, 0)
    xs = [torch.randn(1, 1, 6), torch.randn(1, 1, 6), torch.randn(2, 1, 6), torch.randn(2, 1, 6)]
    for step, x in enumerate(xs):
        header, tensors = described(Kind.FORWARD, x, torch.ones(x.shape[:2]), step=step)
        sender.send(header, b"", tensors)
    made = []
    for step, x in enumerate(xs):
        spare = receiver._spare
        made.append(None if spare is None else spare.data_ptr())
        got = receiver.recv(post_next=False)
        assert torch.equal(got.x, x) and got.mask.all() and got.mask.shape == x.shape[:2]
        assert (made[-1] == got.x.data_ptr()) == (step in (1, 3))  # the one made ahead
        receiver.post()
    assert made[0] is None and made[2] is not None  # made for the old shape, not used


# ---- planning the parts -----------------------------------------------------------------------


def _manifest(begin: int, mids: list[int], end: int) -> Manifest:
    files = {"begin.safetensors": {"bytes": begin}, "end.safetensors": {"bytes": end}}
    files.update({f"mid.{i:05d}.safetensors": {"bytes": b} for i, b in enumerate(mids)})
    return Manifest(arch="llama", num_layers=len(mids), dtype="float32", files=files)


def test_auto_parts_cut_equal_weight_bytes_round_the_ring():
    # rank 0 holds the end (the head) too, its bytes counted there: begin and end each weigh
    # three layers, so with 3 ranks rank 0 holds begin and end alone and the others 6 layers
    assert auto_parts(_manifest(3, [1] * 12, 3), 3) == ["b + e", "0-6", "6-12"]
    assert auto_parts(_manifest(0, [1] * 6, 0), 3) == ["b 0-2 + e", "2-4", "4-6"]
    assert auto_parts(_manifest(2, [1] * 8, 2), 2) == ["b 0-2 + e", "2-8"]
    assert auto_parts(_manifest(5, [1] * 4, 1), 1) == ["b 0-4 e"]
    assert auto_parts(_manifest(1, [1] * 2, 1), 3) == ["b + e", "0-1", "1-2"]
    with pytest.raises(ChainError, match="at least one layer"):
        auto_parts(_manifest(1, [1] * 2, 1), 4)


def test_auto_parts_with_the_end_on_the_last_rank():
    # a cut by layer count (0-4 | 4-8 | 8-12) would give 7 | 4 | 7; by bytes every rank holds 6
    line = {"end_on_rank0": False}
    assert auto_parts(_manifest(3, [1] * 12, 3), 3, **line) == ["b 0-3", "3-9", "9-12 e"]
    assert auto_parts(_manifest(0, [1] * 6, 0), 3, **line) == ["b 0-2", "2-4", "4-6 e"]
    assert auto_parts(_manifest(5, [1] * 4, 1), 1, **line) == ["b 0-4 e"]
    with pytest.raises(ChainError, match="at least one layer"):
        auto_parts(_manifest(1, [1] * 2, 1), 3, **line)


def test_given_parts_are_checked_like_any_chain():
    manifest = _manifest(1, [1] * 6, 1)
    assert plan_parts(manifest, "b 0-2, 2-4 ,4-6 e", 3) == ["b 0-2", "2-4", "4-6 e"]
    assert plan_parts(manifest, "2-4,b 0-2,4-6 e", 3) == ["2-4", "b 0-2", "4-6 e"]  # any rank
    assert plan_parts(manifest, "b 0-2+e, 2-4,4-6", 3) == ["b 0-2 + e", "2-4", "4-6"]
    assert plan_parts(manifest, "auto", 2) == ["b 0-2 + e", "2-6"]
    with pytest.raises(ChainError, match="gap: no node holds layers 3-4"):
        plan_parts(manifest, "b 0-2,2-3,4-6 e", 3)
    with pytest.raises(ChainError, match="2 specs for 3 ranks"):
        plan_parts(manifest, "b 0-3,3-6 e", 3)
    with pytest.raises(ChainError, match="ranks 0 and 1 both hold"):
        plan_parts(manifest, "b 0-6 e,b 0-6 e", 2)
    with pytest.raises(ChainError, match="no node holds end"):
        plan_parts(manifest, "b 0-2,2-6", 2)
    with pytest.raises(ChainError, match="rank 1 is given 2 parts"):
        plan_parts(manifest, "b 0-2,2-4 + e,4-6", 3)
    with pytest.raises(ChainError, match="rank 0 is given 3 parts"):
        plan_parts(manifest, "b 0-2 + 2-4 + e,4-6", 2)
    with pytest.raises(ChainError, match=r"rank 0 \[.*\] and rank 0 \[.*\] both hold begin"):
        plan_parts(manifest, "b 0-6 + b 0-6 e,e", 2)
    with pytest.raises(ChainError, match=r"--parts: rank 0's 'b 0-2 \+': .*empty"):
        plan_parts(manifest, "b 0-2 +,2-6 e", 2)


# ---- micro-batches in flight (no processes) ---------------------------------------------------


class _QueueLink:
    """A stand-in for a RankLink: ``submit_forward`` records the call, ``result`` answers it
    (adds ``add``); counts the most calls it had in flight at once."""

    def __init__(self, add: float, one_at_a_time: bool) -> None:
        self.add, self.one_at_a_time = add, one_at_a_time
        self.in_flight = self.most = 0

    def submit_forward(self, session_id, step, x, mask):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        link = self

        class Pending:
            def result(self):
                link.in_flight -= 1
                return x + link.add, 0.0

        return Pending()


class _NowLink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def forward(self, session_id, step, x, mask):
        self.calls.append((session_id, step))
        return x * 10, 0.0


@pytest.mark.parametrize("one_at_a_time, most", [(False, 4), (True, 1)])
def test_micro_batches_in_flight_come_back_in_order(one_at_a_time, most):
    from llm_partial_run.dist import forward_in_flight

    remote = [_QueueLink(1, one_at_a_time), _QueueLink(100, one_at_a_time)]
    links = [_NowLink(), *remote]
    xs = [torch.tensor([float(k)]) for k in range(4)]
    out = forward_in_flight(links, ["a", "b", "c", "d"], 0, xs)
    assert [float(o) for o in out] == [k * 10 + 101 for k in range(4)]
    assert [link.most for link in remote] == [most, most]  # gloo: all queued at the rank


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_sequences_in_flight_go_on_step_by_step_without_a_barrier(one_at_a_time):
    from llm_partial_run.dist import forward_in_flight

    first = _NowLink()
    links = [first, _QueueLink(1, one_at_a_time), _QueueLink(100, one_at_a_time)]
    cycles = {0: 3, 1: 1, 2: 2}  # passes through the chain per micro-batch
    done = dict.fromkeys(cycles, 0)

    def then(k, out):
        done[k] += 1
        return out if done[k] < cycles[k] else None  # the output is the next input

    out = forward_in_flight(links, ["a", "b", "c"], 5, [torch.tensor([1.0])] * 3, then=then)
    one = lambda x: x * 10 + 101  # noqa: E731
    assert [float(o) for o in out] == [one(one(one(1))), one(1), one(one(1))]
    for sid, k in zip("abc", cycles, strict=True):  # each session's steps, in order
        assert [step for s, step in first.calls if s == sid] == [5 + c for c in range(cycles[k])]


# ---- ranks in processes -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Ranks:
    """Rank processes started with the env:// rendezvous (each this file run as a script)."""

    procs: list[subprocess.Popen]

    @classmethod
    def start(cls, world: int, *args: str) -> Ranks:
        """``world`` processes of ``python ARGS`` (default: this file) joined by env://."""
        port = str(_free_port())
        procs = [
            subprocess.Popen(
                [sys.executable, *(args if args[0] == "-m" else (str(HERE), *args))],
                env=_env(
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port,
                    RANK=str(r),
                    WORLD_SIZE=str(world),
                    LOCAL_RANK=str(r),
                ),  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for r in range(world)
        ]
        return cls(procs)

    def wait_line(
        self, rank: int, prefix: str, timeout: float = LAUNCH_TIMEOUT, stream_name: str = "stdout"
    ) -> str:
        """Read rank's stdout (or stderr) until a line starting with ``prefix`` (or holding it,
        on stderr); fails if the rank exits first."""
        stream = getattr(self.procs[rank], stream_name)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([stream], [], [], left)[0]:
                break
            line = stream.readline()
            if line.startswith(prefix) or (stream_name == "stderr" and prefix in line):
                return line
            if not line:
                self.procs[rank].wait()
                raise AssertionError(f"rank {rank} exited: {self.procs[rank].stderr.read()}")
        raise AssertionError(f"rank {rank} printed no {prefix!r} line within {timeout} s")

    def finish(self, timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str, str]]:
        """Wait for every rank: (exit code, stdout rest, stderr) per rank."""
        out = []
        for proc in self.procs:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            out.append((proc.returncode, stdout, stderr))
        return out

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


# ---- fake parts: the transport alone ----------------------------------------------------------


class FakeCache:
    """A cache that counts positions and keeps per-row offsets (so keep_rows/join show)."""

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.offset = torch.arange(batch_size, dtype=torch.float32) * 100
        self.layers: list = []

    @property
    def rows(self) -> int:
        return len(self.offset)

    def keep_rows(self, rows: list[int]) -> None:
        self.offset = self.offset[rows]

    def join(self, other: FakeCache) -> None:
        self.offset = torch.cat((self.offset, other.offset))


class FakePart:
    """Rank r's part of a 3-layer 'model' of width 4: begin turns ids into floats, layer 1
    doubles (and fails on values >= 999), end adds one; each part adds its cache's position
    count and row offset."""

    def __init__(self, rank: int, world: int = 3) -> None:
        from types import SimpleNamespace

        from llm_sepweight import PartSpec

        self.rank = 0 if rank == 0 else 2 if rank == world - 1 else 1  # its role: 1 doubles
        specs = ["b 0-1", *(f"{r}-{r + 1}" for r in range(1, world - 1)), f"{world - 1}-{world} e"]
        self.spec = PartSpec.parse(specs[rank])
        self.config = SimpleNamespace(num_hidden_layers=world)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def new_cache(self, batch_size: int, max_len: int) -> FakeCache:
        if self.rank == 2 and max_len == 999:
            raise ValueError("no cache of 999 positions here")
        return FakeCache(batch_size, max_len)

    def cache_bytes(self, batch_size: int, max_len: int) -> int:
        return 8 * batch_size * max_len

    def __call__(self, x, mask=None, cache=None):
        if self.rank == 0:
            x = x.float()[..., None].repeat(1, 1, 4)
        elif self.rank == 1:
            if float(x.max()) >= 999:
                raise ValueError(f"value {float(x.max())} is out of range")
            x = x * 2
        else:
            x = x + 1
        if cache is not None:
            x = x + (cache.length + cache.offset[: x.shape[0], None, None]).to(x.dtype)
            cache.length += x.shape[1]
        if mask is not None:
            x = x * mask[..., None]
        return x


def _fake_main(mode: str) -> None:
    """A rank of the fake cluster: ranks > 0 serve; rank 0 runs the scenario ``mode``."""
    from llm_partial_run.dist import Cluster, close_ranks, init_ranks, serve_rank
    from llm_partial_run.errors import NodeError
    from llm_partial_run.local import LocalLink, part_info

    groups = init_ranks("cpu", timeout=CALLS_TIMEOUT if mode == "calls" else FAULT_TIMEOUT,
                        spin=SPIN if mode == "spin" else 0.0)  # fmt: skip
    part = FakePart(groups.rank, groups.world_size)
    link = LocalLink(part, info=part_info(part, arch="fake"),
                     name=f"rank {groups.rank}")  # fmt: skip

    def fail_now(exc: NodeError) -> None:  # the heartbeat found a rank gone (as launch does)
        print(f"error {exc}", file=sys.stderr, flush=True)
        os._exit(3)

    try:
        if groups.rank > 0:
            print("serving", flush=True)
            serve_rank(link, groups)
            print("stopped", flush=True)
        else:
            with Cluster(groups, on_failure=fail_now) as cluster:
                scenario = {"calls": _scenario_calls, "kill": _scenario_kill,
                            "idle": _scenario_idle, "spin": _scenario_spin}[mode]  # fmt: skip
                print("result " + json.dumps(scenario(link, cluster)), flush=True)
    except NodeError as exc:
        fail_now(exc)
    close_ranks()


def _scenario_calls(local, cluster) -> dict:
    from llm_partial_run.dist import forward_in_flight
    from llm_partial_run.errors import SessionError
    from llm_partial_run.session import Pipeline

    found: dict = {}
    per_rank = Pipeline([cluster.links[1], local, cluster.links[0]])  # ordered by the chain
    found["chain"] = [link.name for link in per_rank.links]
    found["infos"] = [info.spec for info in per_rank.infos]
    with per_rank.session(batch_size=1, max_len=8) as session:
        found["per_rank"] = session(torch.tensor([[1]])).tolist()
    pipeline = Pipeline(cluster.chain(local))  # rank 0's part, then ranks 1-2 as one link
    found["merged"] = [link.name for link in pipeline.links]
    found["merged_infos"] = [info.spec for info in pipeline.infos]
    chain = pipeline.links[1]
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    with pipeline.session(batch_size=2, max_len=16) as session:
        found["step0"] = session(ids, mask).tolist()
        before, ends = cluster.stats(), (cluster.ring.sender.sent, cluster.ring.receiver.received)
        found["step1"] = session(ids[:, -1:], None).tolist()
        ends_after = (cluster.ring.sender.sent, cluster.ring.receiver.received)
        after = cluster.stats()
        found["rank0_messages"] = [b - a for a, b in zip(ends, ends_after, strict=True)]
        found["rank_messages"] = [
            {
                k: v - a[k] if k in ("received", "sent", "caught", "ran", "passed") else v
                for k, v in b.items()
            }
            for a, b in zip(before, after, strict=True)
        ]
        session.keep_rows([1])
        found["kept"] = session(ids[:1, -1:], None).tolist()
        found["repeat"] = chain.forward(session.id, 2, torch.ones(1, 1, 4), None)[0].tolist()
        try:
            chain.forward(session.id, 9, torch.ones(1, 1, 4), None)
        except SessionError as exc:
            found["out_of_order"] = str(exc)
    with pipeline.session(batch_size=1, max_len=8) as session:
        try:
            session(torch.tensor([[999]]), None)
        except SessionError as exc:
            found["part_error"] = str(exc)
    a, b = pipeline.session(1, 8), pipeline.session(1, 8)
    a(torch.tensor([[1]])), b(torch.tensor([[2]]))
    a.join(b)
    found["joined"] = a(torch.tensor([[1], [2]])).tolist()
    a.close()
    sessions = [pipeline.session(1, 8) for _ in range(4)]
    xs = [torch.tensor([[k]]) for k in range(4)]
    outs = forward_in_flight(pipeline.links, [s.id for s in sessions], 0, xs)
    found["in_flight"] = [o.tolist() for o in outs]
    x = torch.full((1, 1, 4), 1.5, dtype=torch.bfloat16)
    found["bf16"] = repr(chain.forward(sessions[0].id, 1, x, None)[0].dtype)
    for s in sessions:
        s.close()
    rank1 = cluster.links[0]  # a message over INLINE_BYTES goes as header, payload, tensors
    big = torch.randn(2, 300, 1024)
    big_mask = torch.rand(2, 300) > 0.5
    rank1.open_session("big", 2, 300)
    out, _ = rank1.forward("big", 0, big, big_mask)  # rank 2 passes it on to rank 0
    row_offset = torch.tensor([0.0, 100.0])[:, None, None]  # FakeCache's
    found["big"] = torch.equal(out, (big * 2 + row_offset) * big_mask[..., None])
    rank1.close_session("big")
    try:  # rank 2 fails to open a session rank 1 opened: rank 1 closes it again
        chain.open_session("refused", 1, 999)
    except SessionError as exc:
        found["open_refused"] = str(exc)
    found["sessions_left_ranks"] = [s["sessions"] for s in cluster.stats()]
    with pipeline.session(batch_size=1, max_len=8) as session:
        session(torch.tensor([[1]]))
        time.sleep(2 * CALLS_TIMEOUT)  # idle past the ranks' timeout: the heartbeat keeps them
        found["after_idle"] = session(torch.tensor([[2]])).tolist()
    found["sessions_left"] = [link.stats()["sessions"] for link in [local]]
    return found


def _scenario_spin(local, cluster) -> dict:
    """Decode steps at a steady pace with every receive polling (``spin``)."""
    from llm_partial_run.session import Pipeline

    found: dict = {"steps": []}
    with Pipeline(cluster.chain(local)).session(batch_size=1, max_len=32) as session:
        for step in range(SPIN_STEPS):
            time.sleep(SPIN_PACE)  # rank 0's own step, as it were
            found["steps"].append(session(torch.tensor([[step + 1]]), None).tolist())
    found["caught"] = [cluster.ring.receiver.caught, *(s["caught"] for s in cluster.stats())]
    return found


def _scenario_idle(local, cluster) -> dict:
    """A few steps, then rank 0 idles (as an API server between requests) until killed."""
    from llm_partial_run.session import Pipeline

    with Pipeline(cluster.chain(local)).session(batch_size=1, max_len=8) as session:
        for step in range(4):
            session(torch.tensor([[1]]), None)
            print(f"step {step}", flush=True)
    print("idle", flush=True)
    while True:
        time.sleep(1)  # idle: only the heartbeat talks to the ranks


def _scenario_kill(local, cluster) -> dict:
    from llm_partial_run.session import Pipeline

    pipeline = Pipeline(cluster.chain(local))
    with pipeline.session(batch_size=1, max_len=1 << 20) as session:
        for step in range(1 << 20):
            session(torch.tensor([[1]]), None)
            print(f"step {step}", flush=True)
            time.sleep(0.01)
    return {}


@pytest.fixture(scope="module")
def fake_calls():
    """The 'calls' scenario run once on three fake ranks: rank 0's findings and every exit."""
    ranks = Ranks.start(3, "fake", "calls")
    try:
        line = ranks.wait_line(0, "result ")
        return json.loads(line.removeprefix("result ")), ranks.finish()
    finally:
        ranks.kill_all()


def _expected(ids, mask, length, offsets):
    """What the three fake parts compute (see FakePart)."""
    x = torch.tensor(ids, dtype=torch.float32)[..., None].repeat(1, 1, 4)
    off = torch.tensor(offsets)[:, None, None]
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    x = (x + length + off) * m
    x = (x * 2 + length + off) * m
    return ((x + 1 + length + off) * m).tolist()


def test_receives_that_poll_over_real_gloo_give_the_same_steps():
    # init_ranks(spin=): at a steady pace each receive sleeps until just before its message
    # is due, then polls the buffer's first byte while gloo's IO thread writes the message
    ranks = Ranks.start(3, "fake", "spin")
    try:
        found = json.loads(ranks.wait_line(0, "result ").removeprefix("result "))
        assert [code for code, _, _ in ranks.finish()] == [0, 0, 0]
    finally:
        ranks.kill_all()
    for step, got in enumerate(found["steps"]):
        assert got == _expected([[step + 1]], [[1]], step, [0])
    assert all(n > 0 for n in found["caught"]), found["caught"]  # rank 0's, ranks 1 and 2's


def test_rank_links_form_a_chain_in_spec_order(fake_calls):
    found, _ = fake_calls
    assert found["chain"] == ["rank 0", "rank 1", "rank 2"]
    assert found["infos"] == ["b 0-1", "1-2", "2-3 e"]


def test_steps_keep_rows_and_join_reach_every_rank(fake_calls):
    found, _ = fake_calls
    assert found["step0"] == _expected([[1, 2, 3], [4, 5, 6]], [[0, 1, 1], [1] * 3], 0, [0, 100])
    assert found["step1"] == _expected([[3], [6]], [[1], [1]], 3, [0, 100])
    assert found["kept"] == _expected([[3]], [[1]], 4, [100])
    assert found["joined"] == _expected([[1], [2]], [[1], [1]], 1, [0, 0])


def test_a_repeated_step_answers_again_and_a_wrong_step_is_refused(fake_calls):
    found, _ = fake_calls
    assert found["repeat"] == found["kept"]  # rank 2 answered step 2 from its last output
    assert "expects step 3, got 9" in found["out_of_order"]


def test_consecutive_ranks_make_one_link_and_hidden_states_go_rank_to_rank(fake_calls):
    found, _ = fake_calls
    assert found["merged"] == ["rank 0", "ranks 1-2"]
    assert found["merged_infos"] == ["b 0-1", "1-3 e"]
    # one decode step: rank 0 sent one message (to rank 1) and received one (from rank 2);
    # rank 1 took it from rank 0 and sent its hidden states to rank 2, which sent the logits
    # to rank 0 (the second STATS call is counted too: it went round the same way)
    assert found["rank0_messages"] == [1, 1]
    assert found["rank_messages"] == [
        {"rank": 1, "from": 0, "to": 2, "received": 2, "sent": 2, "caught": 0, "ran": 2,
         "passed": 0, "sessions": 1, "cache_bytes": 8 * 2 * 16},
        {"rank": 2, "from": 1, "to": 0, "received": 2, "sent": 2, "caught": 0, "ran": 2,
         "passed": 0, "sessions": 1, "cache_bytes": 8 * 2 * 16},
    ]  # fmt: skip
    # a link per rank still works (each call goes round the ring; the other rank passes it)
    assert found["per_rank"] == _expected([[1]], [[1]], 0, [0])


def test_a_session_a_later_rank_cannot_open_is_closed_on_the_earlier_ones(fake_calls):
    found, _ = fake_calls
    assert found["open_refused"] == (
        "rank 2: cannot make a cache of 7992 bytes: no cache of 999 positions here"
    )
    assert found["sessions_left_ranks"] == [0, 0]


def test_a_failing_call_comes_back_as_an_error_and_the_rank_goes_on(fake_calls):
    found, exits = fake_calls
    assert found["part_error"] == "rank 1 refused FORWARD: ValueError: value 999.0 is out of range"

    assert found["in_flight"] == [_expected([[k]], [[1]], 0, [0]) for k in range(4)]
    assert found["bf16"] == "torch.bfloat16"
    assert found["big"]
    assert found["sessions_left"] == [0]
    assert found["after_idle"] == _expected([[2]], [[1]], 1, [0])
    assert [code for code, _, _ in exits] == [0, 0, 0], exits
    assert all("stopped" in out for _, out, _ in exits[1:])


def _assert_all_end_naming(
    ranks: Ranks, victim: int, stream_name: str = "stdout", after: str = "step 3"
) -> None:
    ranks.wait_line(0, after, stream_name=stream_name)
    killed_at = time.monotonic()
    ranks.procs[victim].send_signal(signal.SIGKILL)
    exits = ranks.finish(timeout=FAULT_TIMEOUT + 30)
    took = time.monotonic() - killed_at
    assert took < FAULT_TIMEOUT, f"the other ranks took {took:.1f} s to end"
    for rank, (code, _, stderr) in enumerate(exits):
        if rank == victim:
            assert code == -signal.SIGKILL
            continue
        assert code != 0, f"rank {rank} exited cleanly after rank {victim} died"
        assert f"rank {victim}" in stderr, stderr


@pytest.mark.parametrize(
    "victim, mode, world",
    [
        (2, "kill", 3),
        (0, "kill", 3),
        (1, "kill", 3),
        (2, "idle", 3),
        (1, "idle", 3),
        (2, "idle", 4),
    ],
)
def test_a_rank_killed_mid_generation_ends_every_other_rank_naming_it(victim, mode, world):
    ranks = Ranks.start(world, "fake", mode)
    # rank 1 killed: rank 2 notices first and sends an ABORT naming it on round the ring.
    # idle: killed once rank 0 waits between requests; only the heartbeat can notice (with 4
    # ranks a middle rank: the last rank's ABORT, not its exit, must be what rank 0 reads)
    try:
        _assert_all_end_naming(ranks, victim, after="idle" if mode == "idle" else "step 3")
    finally:
        ranks.kill_all()


# ---- whole models over torchrun ---------------------------------------------------------------

NEW_TOKENS = 10


def _torchrun(directory: Path, *args: str, nproc: int = 3) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m llm_partial_run.launch DIR ARGS`` on 127.0.0.1."""
    cmd = [str(TORCHRUN), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "llm_partial_run.launch", str(directory),
           *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _launched_tokens(
    directory: Path, batches: list[list[list[int]]], *args: str, nproc: int = 3
) -> list:
    """Each batch's greedy tokens as ``nproc`` ranks under torchrun generate them."""
    ids = [
        a for batch in batches for a in ("--ids", ";".join(",".join(map(str, r)) for r in batch))
    ]
    done = _torchrun(directory, *ids, "--max-new-tokens", str(NEW_TOKENS), *args, nproc=nproc)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [line["tokens"] for line in lines]


def _alone(model, rows: list[list[int]]) -> list[list[int]]:
    """transformers' greedy tokens for each row run alone (the padding contract's reference)."""
    from llm_sampler import HFCausalLM, generate

    with torch.no_grad():
        return [
            generate(HFCausalLM(model), [row], max_new_tokens=NEW_TOKENS, cached=True)[0]
            for row in rows
        ]


def _in_process(pipeline, batch: list[list[int]]) -> list[list[int]]:
    from llm_sampler import generate

    max_len = max(map(len, batch)) + NEW_TOKENS
    with pipeline.session(batch_size=len(batch), max_len=max_len) as session:
        return generate(session, batch, max_new_tokens=NEW_TOKENS, cached=True)


TINY_BATCHES = [[[5, 17, 3, 88, 41]], [[7, 1, 60, 2, 19, 33, 4], [42, 9]]]  # b1; left-padded


@pytest.mark.parametrize(
    "which, args",
    [("llama", ("--parts", "auto")),
     # rank 0 holding begin and end (given), its layers streamed
     ("falcon", ("--parts", "b 0-2 + e,2-4,4-6", "--resident-layers", "1"))],
)  # fmt: skip
def test_tiny_models_on_three_ranks_equal_transformers_and_the_other_pipelines(
    which, args, request, shared_nodes
):
    from llm_partial_run.session import LocalModel, Pipeline

    tiny = request.getfixturevalue(f"tiny_{which}")
    got = _launched_tokens(tiny.directory, TINY_BATCHES, *args)
    for batch, tokens in zip(TINY_BATCHES, got, strict=True):
        assert tokens == _alone(tiny.hf, batch)
        assert tokens == _in_process(LocalModel(tiny.directory, specs=tiny.specs), batch)
    if which == "llama":  # and the socket pipeline on the same parts
        with Pipeline(shared_nodes(tiny.directory, tiny.specs)) as pipeline:
            assert got == [_in_process(pipeline, batch) for batch in TINY_BATCHES]


def test_ranks_holding_parts_out_of_ring_order_still_chain(tiny_llama):
    # rank 1 holds begin: the chain is rank 1, rank 0, rank 2 -- no run of consecutive ranks,
    # so each part is its own link and every call goes round the ring (the others pass it on)
    got = _launched_tokens(tiny_llama.directory, TINY_BATCHES, "--parts", "2-4,b 0-2,4-6 e")
    assert got == [_alone(tiny_llama.hf, batch) for batch in TINY_BATCHES]


def test_one_rank_holds_the_whole_model(tiny_llama):
    got = _launched_tokens(tiny_llama.directory, TINY_BATCHES[:1], nproc=1)
    assert got == [_alone(tiny_llama.hf, TINY_BATCHES[0])]


def test_smollm2_on_three_ranks_equals_transformers(smollm2_sepweight, smollm2_transformers):
    from llm_partial_run.session import LocalModel
    from llm_partial_run.text import Tokenizer

    tokenizer = Tokenizer.from_dir(smollm2_sepweight)
    texts = ["The capital of France is", "Hello", "Three things to pack for a hike:"]
    rows = [tokenizer.encode(t) for t in texts]
    batches = [rows[:1], rows[1:]]
    got = _launched_tokens(smollm2_sepweight, batches, "--no-verify")
    model, _ = smollm2_transformers
    local = LocalModel(smollm2_sepweight, specs=["b 0-10", "10-20", "20-30 e"])
    for batch, tokens in zip(batches, got, strict=True):
        assert tokens == _alone(model, batch)
        assert tokens == _in_process(local, batch)


def test_a_prompt_is_tokenized_and_answered_as_text_by_rank_zero(smollm2_sepweight):
    done = _torchrun(smollm2_sepweight, "--prompt", "The capital of France is",
                     "--max-new-tokens", "4", "--no-verify", nproc=2)  # fmt: skip
    assert "Paris" in done.stdout


def test_a_rank_killed_while_a_model_generates_ends_the_launch_naming_it(tiny_llama):
    ranks = Ranks.start(3, "-m", "llm_partial_run.launch", str(tiny_llama.directory), "-v",
                        "--ids", "1,2,3", "--max-new-tokens", "2000",
                        "--timeout", str(FAULT_TIMEOUT))  # fmt: skip
    try:
        _assert_all_end_naming(ranks, 1, stream_name="stderr")
    finally:
        ranks.kill_all()


def test_the_http_api_answers_over_two_ranks(smollm2_sepweight, smollm2_transformers):
    import urllib.request

    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "llm_partial_run.launch",
           str(smollm2_sepweight), "--no-verify", "--api", "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip
    try:
        url = Ranks([proc]).wait_line(0, "ready ").split()[1]
        body = {"model": smollm2_sepweight.name, "prompt": "The capital of France is",
                "max_tokens": 6, "temperature": 0}  # fmt: skip
        request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            text = json.loads(response.read())["choices"][0]["text"]
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its ranks
        proc.communicate(timeout=60)
    model, tokenizer = smollm2_transformers
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.cuda
def test_nccl_ranks_equal_the_cpu_ranks(tiny_llama):
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"needs 2 CUDA devices for 2 NCCL ranks, found {count}")
    batches = TINY_BATCHES
    cpu = _launched_tokens(tiny_llama.directory, batches)
    assert _launched_tokens(tiny_llama.directory, batches, "--device", "cuda") == cpu


if __name__ == "__main__":
    _fake_main(sys.argv[2])
