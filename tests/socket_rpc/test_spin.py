"""Spin-before-block: same results with and without it, deadlines kept, prompt shutdown, TLS."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from socket_rpc import Client, RPCConnectionError, RPCTimeoutError, Server
from socket_rpc.limits import Limits
from socket_rpc.wire import DEFAULT_SPIN, Channel, check_spin, pack

from .conftest import Calls, make_server, tls_contexts


def _canonical(value: Any) -> Any:
    """A comparable form of a value that keeps types, dtypes, shapes and exact bytes."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, torch.Tensor):
        flat = value.contiguous().reshape(-1).view(torch.uint8)
        return ("tensor", str(value.dtype), tuple(value.shape), bytes(flat.numpy()))
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_canonical(v) for v in value])
    if isinstance(value, dict):
        return ("dict", {k: _canonical(v) for k, v in value.items()})
    return (type(value).__name__, value)


def _values() -> list[Any]:
    rng = np.random.default_rng(3)
    numpy_arrays = [
        rng.standard_normal((3, 5)).astype(dtype)
        for dtype in ("float16", "float32", "float64", "complex64", "complex128")
    ] + [
        rng.integers(-100, 100, (4, 2)).astype(dtype)
        for dtype in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
    ]
    numpy_arrays += [np.array([True, False]), np.float32(2.5) * np.ones(()), np.empty((2, 0))]
    tensors = [
        torch.randn(3, 4, dtype=dtype)
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64)
    ] + [torch.arange(12, dtype=torch.int64).reshape(3, 4)[:, 1:3], torch.ones(0, 3)]
    return [
        None,
        True,
        -(2**70),
        math.nan,
        -0.0,
        "ü ✓",
        b"\x00\xff" * 10,
        b"",
        [1, [2, (3, {"k": None})]],
        (),
        {"nested": {"a": [1.5, "x"]}},
        *numpy_arrays,
        *tensors,
        np.ones(4096, np.float32),  # a 16 KiB array: one message that fits the staging buffer
        np.arange(300_000, dtype=np.float64),  # a body larger than the staging buffer
        {"mixed": (torch.ones(2, 2), np.zeros(3), b"raw", [None, 1])},
    ]


@pytest.fixture(scope="module")
def spinning_pair() -> Iterator[tuple[Client, Client]]:
    """A client/server pair that never spins and one that spins for much longer than a call."""
    with make_server(spin=0) as still, make_server(spin=0.01) as spinning:
        with (
            Client(*still.address, spin=0, timeout=60) as off,
            Client(*spinning.address, spin=0.01, timeout=60) as on,
        ):
            yield off, on


@pytest.mark.parametrize("index", range(len(_values())))
def test_spin_on_and_off_return_identical_values(
    spinning_pair: tuple[Client, Client], index: int
) -> None:
    off, on = spinning_pair
    value = _values()[index]
    expected = _canonical(value)
    assert _canonical(off.echo(value)) == expected
    assert _canonical(on.echo(value)) == expected
    # kwargs, several arguments and the no-timeout path (a socket in blocking mode) as well
    assert _canonical(on.call_with_timeout(None, "echo", value, key=value)) == _canonical(
        off.call_with_timeout(None, "echo", value, key=value)
    )


def test_spin_is_the_default_and_can_be_turned_off() -> None:
    assert DEFAULT_SPIN > 0
    with make_server() as server, make_server(spin=0) as still:
        assert server.spin == DEFAULT_SPIN and still.spin == 0.0
        with Client(*server.address) as client, Client(*still.address, spin=0) as plain:
            assert client.spin == DEFAULT_SPIN and plain.spin == 0.0
            assert client.add(1, 2) == plain.add(1, 2) == 3


def test_a_reply_after_the_spin_ends_is_still_received() -> None:
    calls = Calls()
    with make_server(calls, spin=0.001) as server:
        with Client(*server.address, spin=0.001) as client:
            threading.Timer(0.2, calls.release.set).start()  # the reply comes ~200x the spin later
            assert client.call_with_timeout(30, "wait_for_release") == "released"
            calls.release.clear()
            threading.Timer(0.2, calls.release.set).start()
            assert client.call_with_timeout(None, "wait_for_release") == "released"
            assert client.add(2, 3) == 5


@pytest.mark.parametrize("client_timeout", [None, 30.0])
def test_a_timeout_shorter_than_the_spin_still_fires(client_timeout: float | None) -> None:
    calls = Calls()
    with make_server(calls) as server:
        try:
            with Client(*server.address, spin=5.0, timeout=client_timeout) as client:
                start = time.monotonic()
                with pytest.raises(RPCTimeoutError):
                    client.call_with_timeout(0.2, "wait_for_release")
                assert time.monotonic() - start < 2.0  # the 5 s spin never extends 0.2 s
        finally:
            calls.release.set()


def test_server_close_ends_spinning_connections_promptly() -> None:
    server = make_server(spin=30.0).start()  # every connection spins 30 s between calls
    clients = [Client(*server.address, spin=0) for _ in range(3)]
    for client in clients:
        assert client.add(1, 1) == 2  # now each connection's thread spins for the next call
    assert len(server._connections) == 3
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 2.0
    assert server._connections == {}
    for client in clients:
        with pytest.raises(RPCConnectionError):
            client.add(1, 1)
        client.close()


def test_a_spinning_client_reconnects_after_the_server_restarts() -> None:
    with make_server(spin=0.001) as first:
        host, port = first.address
        client = Client(host, port, spin=0.001)
        assert client.add(1, 2) == 3
    with make_server(port=port, spin=0.001):
        assert client.add(3, 4) == 7  # the dead idle connection is noticed and replaced
    client.close()


def test_tls_with_spin_configured_works(certificate: tuple[Path, Path]) -> None:
    server_context, client_context = tls_contexts(certificate)
    calls = Calls()
    server = make_server(calls, ssl_context=server_context, token="t", spin=0.01)
    with server, contextlib.ExitStack() as cleanup:
        cleanup.callback(calls.release.set)  # the timed-out call's function ends before close
        with Client(
            *server.address, ssl_context=client_context, token="t", spin=0.01, timeout=60
        ) as client:
            assert client.spin == 0.01  # kept, but TLS connections do not spin
            x = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
            for _ in range(3):
                assert np.array_equal(client.echo(x), x)
                assert client.add(1, 2) == 3
                assert torch.equal(client.echo(torch.ones(4096)), torch.ones(4096))
            with pytest.raises(RPCTimeoutError):
                client.call_with_timeout(0.2, "wait_for_release")
            assert client.add(2, 2) == 4  # a fresh connection replaces the timed-out one


@pytest.mark.parametrize("bad", [-1e-6, -1, math.nan, math.inf, -math.inf])
def test_bad_spin_values_are_refused_at_construction(bad: float) -> None:
    with pytest.raises(ValueError, match="spin"):
        Client("127.0.0.1", 9, spin=bad, connect=False)
    with pytest.raises(ValueError, match="spin"):
        Server(spin=bad)


@pytest.mark.parametrize("bad", ["50e-6", None, True, [0.1], 1j])
def test_spin_values_that_are_not_numbers_are_refused(bad: Any) -> None:
    with pytest.raises(TypeError, match="spin"):
        Client("127.0.0.1", 9, spin=bad, connect=False)
    with pytest.raises(TypeError, match="spin"):
        Server(spin=bad)
    with pytest.raises(TypeError, match="spin"):
        check_spin(bad)


def test_integer_spin_values_are_accepted() -> None:
    assert check_spin(0) == 0.0
    assert Client("127.0.0.1", 9, spin=1, connect=False).spin == 1.0


# ---- the channel itself --------------------------------------------------------------------------


@pytest.fixture
def channel_pair() -> Iterator[tuple[socket.socket, Channel]]:
    a, b = socket.socketpair()
    channel = Channel(b, Limits(), spin=5.0)
    try:
        yield a, channel
    finally:
        a.close()
        channel.close()


def test_a_channel_spins_until_a_message_arrives(
    channel_pair: tuple[socket.socket, Channel],
) -> None:
    a, channel = channel_pair
    message = pack({"kind": "x"}, [memoryview(b"abc")])
    threading.Timer(0.05, lambda: a.sendall(message.head + b"".join(message.parts))).start()
    frame = channel.receive()
    assert frame is not None and frame.header["kind"] == "x"
    assert bytes(frame.buffers[0]) == b"abc"


def test_a_channel_spinning_with_a_deadline_times_out_on_time(
    channel_pair: tuple[socket.socket, Channel],
) -> None:
    _, channel = channel_pair
    for timeout in (None, 60.0):  # the socket blocking, or with a timeout, when the spin starts
        channel.sock.settimeout(timeout)
        channel._timeout = timeout
        start = time.monotonic()
        with pytest.raises(RPCTimeoutError):
            channel.receive(time.monotonic() + 0.1)
        assert time.monotonic() - start < 2.0
    with pytest.raises(RPCTimeoutError):
        channel.receive(time.monotonic() - 1.0)  # a deadline already passed


def test_a_channel_spinning_sees_the_peer_hang_up(
    channel_pair: tuple[socket.socket, Channel],
) -> None:
    a, channel = channel_pair
    threading.Timer(0.05, a.close).start()
    start = time.monotonic()
    assert channel.receive() is None  # a clean end of stream between messages
    assert time.monotonic() - start < 2.0


def test_a_channel_spinning_sees_a_hang_up_mid_message(
    channel_pair: tuple[socket.socket, Channel],
) -> None:
    a, channel = channel_pair
    a.sendall(pack({"kind": "x"}).head[:10])
    a.close()
    with pytest.raises(RPCConnectionError):
        channel.receive()
