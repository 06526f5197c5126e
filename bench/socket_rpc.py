"""socket_rpc against a raw Python socket doing the same bytes, side by side on 127.0.0.1.

    python bench/socket_rpc.py            (or: bash dev.sh bench socket_rpc)

The servers run in a child process (so client and server do not share a GIL). Each line measures
the same transfer twice in alternating rounds: once through socket_rpc (``echo(x)`` returns ``x``),
once through a raw socket that sends an 8-byte length and the payload and gets them back, into
buffers it allocated once (the limit: no headers, no allocation, no decoding). Throughput counts
the bytes both ways; times are round-trip medians.

Targets (issue 4): large transfers >= 0.7x raw throughput; small calls within 2x of the raw
ping-pong and under 150 us median. A last line, for reference, times a raw socket that only
encodes and decodes one small JSON header per message (no values, no dispatch): the floor of any
protocol with a JSON header written in Python, which socket_rpc's wire format is.

On a virtual machine, a thread that blocks in ``recv`` and is woken by the peer's reply pays the
hypervisor's wake-up of an idle vCPU, tens of microseconds per message, more than the socket work
itself. socket_rpc therefore spins (non-blocking receives, yielding the CPU in between, for up to
``--spin`` seconds, its default unless given) before it blocks. Each small call is printed
twice: against the raw blocking ping-pong the issue defines (the limit), and against a raw socket
whose client and server spin the same way before blocking (the best a Python socket does here).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

# This file is named like the package: keep its folder off the path so `import socket_rpc` finds
# the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

LENGTH = struct.Struct("<Q")
PREFIX = struct.Struct("<4sHHIQ")


# ---- the child process: a raw echo server and a socket_rpc server ------------------------------


def _spin_recv(sock: socket.socket, view: memoryview, spin: float) -> int:
    """Non-blocking receives for up to ``spin`` seconds, then a blocking one (as socket_rpc)."""
    until = time.monotonic() + spin
    while True:
        try:
            return sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.monotonic() >= until:
                return sock.recv_into(view)
            os.sched_yield()


def _recv_exact(sock: socket.socket, view: memoryview, spin: float = 0.0) -> None:
    got = 0
    if spin and len(view):
        got = _spin_recv(sock, view, spin)
        if got == 0:
            raise ConnectionError("closed")
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("closed")
        got += n


def _raw_echo(conn: socket.socket, spin: float = 0.0) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = memoryview(bytearray(300 << 20))
    head = bytearray(8)
    try:
        while True:
            _recv_exact(conn, memoryview(head), spin)
            (size,) = LENGTH.unpack(head)
            _recv_exact(conn, buffer[:size])
            conn.sendmsg([head, buffer[:size]]) if size < 65536 else _send_all(
                conn, head, buffer[:size]
            )
    except (ConnectionError, OSError):
        conn.close()


def _send_all(sock: socket.socket, head: bytes, payload: memoryview) -> None:
    sock.sendall(head)
    sock.sendall(payload)


def _json_echo(conn: socket.socket) -> None:
    """The floor of any JSON-header protocol in Python: one header decoded and one encoded."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray(65536)
    try:
        while n := conn.recv_into(buffer):
            call = json.loads(bytes(buffer[20:n]))
            reply = json.dumps({"kind": "result", "id": call["id"], "value": None}).encode()
            conn.sendall(PREFIX.pack(b"SRPC", 1, 0, len(reply), 0) + reply)
    except OSError:
        conn.close()


class JsonClient:
    """A raw socket sending and receiving one small JSON header per message, nothing else."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray(65536)
        self.id = 0

    def ping(self) -> None:
        self.id += 1
        call = json.dumps({"kind": "call", "id": self.id, "function": "ping", "args": []}).encode()
        self.sock.sendall(PREFIX.pack(b"SRPC", 1, 0, len(call), 0) + call)
        n = self.sock.recv_into(self.buffer)
        json.loads(bytes(self.buffer[20:n]))


def _serve_raw(listener: socket.socket, handler) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def serve(spin: float) -> None:
    from socket_rpc import Server

    raw = socket.create_server(("127.0.0.1", 0))
    server = Server(spin=spin)

    @server.expose
    def echo(x=None):
        return x

    @server.expose
    def ping():
        return None

    server.start()
    json_listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_serve_raw, args=(json_listener, _json_echo), daemon=True).start()
    spinning = socket.create_server(("127.0.0.1", 0))
    spin_echo = functools.partial(_raw_echo, spin=spin)
    threading.Thread(target=_serve_raw, args=(spinning, spin_echo), daemon=True).start()
    ports = [raw, server, json_listener, spinning]
    print(*(p.getsockname()[1] if isinstance(p, socket.socket) else p.address[1] for p in ports))
    sys.stdout.flush()
    _serve_raw(raw, _raw_echo)


# ---- the parent: measurements -------------------------------------------------------------------


class RawClient:
    def __init__(self, port: int, spin: float = 0.0) -> None:
        self.spin = spin
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = bytearray(8)
        self.buffer = memoryview(bytearray(300 << 20))

    def round_trip(self, payload: memoryview) -> None:
        size = payload.nbytes
        if size < 65536:
            self.sock.sendmsg([LENGTH.pack(size), payload])
        else:
            self.sock.sendall(LENGTH.pack(size))
            self.sock.sendall(payload)
        _recv_exact(self.sock, memoryview(self.head), self.spin)
        _recv_exact(self.sock, self.buffer[:size])


def _timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def large(raw: RawClient, client, mib: int, rounds: int) -> None:
    x = np.random.default_rng(0).standard_normal(mib << 18, dtype=np.float32)  # mib MiB
    payload = memoryview(x).cast("B")
    raw_t, rpc_t = [], []
    y = client.echo(x)  # warm-up, and a check that the bytes come back
    if not np.array_equal(x, y):
        raise SystemExit("socket_rpc returned different bytes")
    del y
    raw.round_trip(payload)
    for _ in range(rounds):
        raw_t += _timed(lambda: raw.round_trip(payload), 1)
        rpc_t += _timed(lambda: client.echo(x), 1)
    nbytes = 2 * x.nbytes
    raw_gbs = nbytes / statistics.median(raw_t) / 1e9
    rpc_gbs = nbytes / statistics.median(rpc_t) / 1e9
    print(
        f"{mib:>4} MiB float32 round trip   raw {raw_gbs:6.2f} GB/s   "
        f"socket_rpc {rpc_gbs:6.2f} GB/s"
        f"   ratio {rpc_gbs / raw_gbs:4.2f}x   (target >= 0.70x)"
    )


def small(
    raw: RawClient,
    label: str,
    raw_payload: memoryview,
    call,
    rounds: int,
    target: str = "(target <= 2x and < 150 us)",
    spinning: RawClient | None = None,
) -> None:
    """Median round trips of ``call`` and of the raw blocking (and spinning) ping-pong."""
    raw_t, spin_t, rpc_t = [], [], []
    for _ in range(200):  # warm-up
        raw.round_trip(raw_payload)
        if spinning is not None:
            spinning.round_trip(raw_payload)
        call()
    for _ in range(rounds):
        raw_t += _timed(lambda: raw.round_trip(raw_payload), 100)
        if spinning is not None:
            spin_t += _timed(lambda: spinning.round_trip(raw_payload), 100)
        rpc_t += _timed(call, 100)
    raw_us = statistics.median(raw_t) * 1e6
    rpc_us = statistics.median(rpc_t) * 1e6
    print(
        f"{label:<30} raw {raw_us:7.1f} us     socket_rpc {rpc_us:7.1f} us   "
        f"ratio {rpc_us / raw_us:4.2f}x   {target}"
    )
    if spinning is not None:
        spin_us = statistics.median(spin_t) * 1e6
        print(
            f"{'  vs raw spinning':<30} raw {spin_us:7.1f} us     socket_rpc {rpc_us:7.1f} us   "
            f"ratio {rpc_us / spin_us:4.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each large transfer")
    parser.add_argument(
        "--spin",
        type=float,
        default=None,
        help="seconds socket_rpc and the spinning raw socket spin before blocking "
        "(default: socket_rpc's default)",
    )
    args = parser.parse_args()
    if args.spin is None:
        from socket_rpc.wire import DEFAULT_SPIN

        args.spin = DEFAULT_SPIN
    if args.serve:
        serve(args.spin)
        return

    import torch

    from socket_rpc import Client

    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--spin", repr(args.spin)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        raw_port, rpc_port, json_port, spin_port = map(int, child.stdout.readline().split())
        raw = RawClient(raw_port)
        spinning = RawClient(spin_port, args.spin)
        with Client("127.0.0.1", rpc_port, spin=args.spin) as client:
            print(f"socket_rpc vs raw socket on 127.0.0.1 (python {sys.version.split()[0]})")
            print(
                f"spin before blocking: {args.spin * 1e6:g} us (socket_rpc client and server, "
                "and the raw spinning client and server)"
            )
            large(raw, client, 32, args.rounds * 3)
            large(raw, client, 256, args.rounds)
            x16 = np.ones(4096, np.float32)
            t16 = torch.ones(4096)
            small(
                raw,
                "16 KiB float32 numpy echo",
                memoryview(x16).cast("B"),
                lambda: client.echo(x16),
                20,
                spinning=spinning,
            )
            small(
                raw,
                "16 KiB float32 torch echo",
                memoryview(x16).cast("B"),
                lambda: client.echo(t16),
                20,
                spinning=spinning,
            )
            small(
                raw, "no-argument call", memoryview(bytes(64)), client.ping, 20, spinning=spinning
            )
            floor = JsonClient(json_port)
            small(
                raw,
                "(reference: bare JSON ping-pong)",
                memoryview(bytes(64)),
                floor.ping,
                20,
                target="",
            )
    finally:
        child.kill()
        child.wait()


if __name__ == "__main__":
    main()
