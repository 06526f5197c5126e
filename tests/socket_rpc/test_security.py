"""Authentication, TLS, and a server that survives whatever bytes arrive on its port."""

from __future__ import annotations

import json
import os
import pickle
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import socket_rpc.wire as wire
from socket_rpc import (
    AuthenticationError,
    Client,
    Limits,
    ProtocolError,
    RPCConnectionError,
    Server,
)
from socket_rpc.auth import client_handshake
from socket_rpc.codec import Decoder, Encoder
from socket_rpc.wire import MAGIC, PREFIX, PROTOCOL_VERSION, Channel, pack

from .conftest import Calls, make_server, tls_contexts

# ---- authentication ------------------------------------------------------------------------------


@pytest.fixture
def auth_server(calls: Calls) -> Iterator[Server]:
    with make_server(calls, token="correct horse") as server:
        yield server


def test_right_token_calls_work(auth_server: Server) -> None:
    with Client(*auth_server.address, token="correct horse") as client:
        assert client.add(1, 2) == 3
    with Client(*auth_server.address, token=b"correct horse") as client:
        assert client.add(1, 2) == 3


@pytest.mark.parametrize("token", ["wrong", None, "correct horse "])
def test_without_the_right_token_no_call_runs(
    auth_server: Server, calls: Calls, token: str | None
) -> None:
    with pytest.raises(AuthenticationError):
        Client(*auth_server.address, token=token)
    lazy = Client(*auth_server.address, token=token, connect=False)
    with pytest.raises(AuthenticationError):
        lazy.add(1, 2)
    assert calls.count == 0


def test_a_client_with_a_token_refuses_a_server_without_one(server: Server) -> None:
    with pytest.raises(AuthenticationError):
        Client(*server.address, token="secret")


def test_a_raw_call_without_the_handshake_runs_nothing(auth_server: Server, calls: Calls) -> None:
    call = pack(
        {"kind": "call", "id": 1, "function": "add", "args": [1, 2], "kwargs": {"dict": {}}}
    )
    with socket.create_connection(auth_server.address, timeout=10) as raw:
        raw.sendall(call.head)
        assert _read_until_closed(raw)  # hello, then an error, then the server hangs up
    assert calls.count == 0


def test_the_token_never_crosses_the_wire(auth_server: Server) -> None:
    # Run the client's side of the handshake over a socket that records what it sends.
    sent = bytearray()

    class Recording(socket.socket):
        def sendall(self, data, flags=0):  # type: ignore[no-untyped-def,override]
            sent.extend(data)
            return super().sendall(data, flags)

    raw = Recording(fileno=socket.create_connection(auth_server.address, timeout=10).detach())
    raw.settimeout(10)
    client_handshake(Channel(raw, Limits()), b"correct horse", time.monotonic() + 10)
    raw.close()
    assert sent and b"correct horse" not in sent and b"correct horse".hex().encode() not in sent


# ---- TLS ----------------------------------------------------------------------------------------


def test_tls_with_a_self_signed_certificate(certificate: tuple[Path, Path]) -> None:
    server_context, client_context = tls_contexts(certificate)
    with make_server(ssl_context=server_context, token="t") as server:
        with Client(*server.address, ssl_context=client_context, token="t") as client:
            x = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)  # > 1 MiB
            for _ in range(3):  # the connection is reused across calls (TLS session tickets)
                assert np.array_equal(client.echo(x), x)
            assert client.add(1, 2) == 3
        # A client that trusts nothing (default CAs) refuses the self-signed certificate.
        with pytest.raises(RPCConnectionError):
            Client(*server.address, ssl_context=ssl.create_default_context(), token="t")
        # A plain-text client gets an error, not a hang, and the server keeps serving.
        with pytest.raises((RPCConnectionError, TimeoutError, AuthenticationError)):
            Client(*server.address, token="t", connect_timeout=0.5)
        with Client(*server.address, ssl_context=client_context, token="t") as client:
            assert client.add(2, 2) == 4
            server.close()  # shuts the TLS connection down too: its thread is gone after close
            assert server._connections == {}


# ---- hostile bytes ------------------------------------------------------------------------------


def _read_until_closed(sock: socket.socket) -> bytes:
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data.extend(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return bytes(data)


def _authenticated_socket(server: Server) -> Channel:
    raw = socket.create_connection(server.address, timeout=10)
    channel = Channel(raw, Limits())
    client_handshake(channel, None, None)
    return channel


def _prefix(header_len: int, body_len: int, magic: bytes = MAGIC, version: int = 1) -> bytes:
    return PREFIX.pack(magic, version, 0, header_len, body_len)


def _reply_after(server: Server, payload: bytes) -> dict:
    """Send ``payload`` after a proper handshake; return the server's answer before it hangs up."""
    channel = _authenticated_socket(server)
    channel.sock.sendall(payload)
    channel.sock.shutdown(socket.SHUT_WR)
    frame = channel.receive(None)
    rest = _read_until_closed(channel.sock)
    channel.close()
    assert rest == b""
    return frame.header if frame is not None else {}


@pytest.fixture(scope="module")
def hardy_server() -> Iterator[Server]:
    with make_server() as server:
        yield server


@pytest.fixture(scope="module")
def hardy_client(hardy_server: Server) -> Iterator[Client]:
    with Client(*hardy_server.address, timeout=30) as client:
        yield client


def test_a_body_claiming_one_tebibyte_is_refused_without_allocating(
    hardy_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocated: list[int] = []
    real = wire._allocate_body
    monkeypatch.setattr(wire, "_allocate_body", lambda n: allocated.append(n) or real(n))
    header = json.dumps({"kind": "call", "id": 1, "function": "echo", "buffers": [1 << 40]})
    payload = _prefix(len(header), 1 << 40) + header.encode() + b"\0" * 1000
    reply = _reply_after(hardy_server, payload)
    assert reply["type"] == "ProtocolError" and "over the limit" in reply["message"]
    assert allocated == []
    # Same with a lying header length.
    reply = _reply_after(hardy_server, _prefix(2**32 - 1, 0) + b"{}")
    assert reply["type"] == "ProtocolError" and "header" in reply["message"]


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        _prefix(2, 0, magic=b"XXXX") + b"{}",
        _prefix(2, 0, version=99) + b"{}",
        _prefix(5, 0) + b"nope!",
        _prefix(2, 0) + b"[]",
        _prefix(4, 0) + b"{} x",
        _prefix(37, 64) + b'{"buffers":[64],"kind":"call","id":1}' + bytes(64),
        _prefix(len(b'{"buffers":[10]}'), 99) + b'{"buffers":[10]}' + bytes(99),
        _prefix(len(b'{"buffers":[-1]}'), 0) + b'{"buffers":[-1]}',
        _prefix(1000, 0) + b"[" * 1000,
    ],
)
def test_malformed_messages_close_that_connection_with_a_protocol_error(
    hardy_server: Server, hardy_client: Client, payload: bytes
) -> None:
    reply = _reply_after(hardy_server, payload)
    assert reply.get("type") in ("ProtocolError", None)
    assert hardy_client.add(20, 22) == 42


def _call_with_tree(args: object, buffers: list[int] | None = None, body: bytes = b"") -> bytes:
    header = json.dumps(
        {"kind": "call", "id": 7, "function": "echo", "args": args, "kwargs": {"dict": {}},
         "buffers": buffers or []}
    ).encode()  # fmt: skip
    return _prefix(len(header), len(body)) + header + body


@pytest.mark.parametrize(
    "payload",
    [
        _call_with_tree([{"evil": 1}]),
        _call_with_tree([{"bytes": 5}]),
        _call_with_tree([{"bytes": 0}, {"bytes": 0}], [3], b"abc"),
        _call_with_tree(
            [{"ndarray": {"dtype": "object", "shape": [1], "buffer": 0}}], [8], b"x" * 8
        ),
        _call_with_tree(
            [{"ndarray": {"dtype": "float32", "shape": [3], "buffer": 0}}], [8], b"x" * 8
        ),
        _call_with_tree([{"tensor": {"dtype": "qint8", "shape": [1], "buffer": 0}}], [1], b"x"),
        _call_with_tree(
            [{"tensor": {"dtype": "float32", "shape": [-1], "buffer": 0}}], [4], b"x" * 4
        ),
        _call_with_tree([{"tensor": {"dtype": "__class__", "shape": [1], "buffer": 0}}], [1], b"x"),
        _call_with_tree({"dict": {}}),
        _call_with_tree([{"ndarray": {"dtype": "float32", "shape": [0, 2**61], "buffer": 0}}], [0]),
        _call_with_tree([{"tensor": {"dtype": "int8", "shape": [0, 2**70], "buffer": 0}}], [0]),
    ],
)
def test_lying_value_trees_are_protocol_errors(
    hardy_server: Server, hardy_client: Client, payload: bytes
) -> None:
    reply = _reply_after(hardy_server, payload)
    assert reply["type"] == "ProtocolError", reply
    assert hardy_client.add(1, 1) == 2


class _CreatesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # what an attacker would send: unpickling opens (creates) the file
        return (open, (self.path, "w"))


def test_a_pickle_payload_is_never_executed(
    hardy_server: Server, hardy_client: Client, tmp_path: Path
) -> None:
    target = tmp_path / "pwned"
    evil = pickle.dumps(_CreatesAFile(str(target)))
    with pytest.raises(Exception):  # noqa: B017 - the local check: unpickling it would work
        pickle.loads(pickle.dumps(_CreatesAFile(str(tmp_path / "nope" / "x"))))
    # 1. Raw, as the old socket_rpc would have received it, before and after the handshake.
    with socket.create_connection(hardy_server.address, timeout=10) as raw:
        raw.sendall(evil)
        _read_until_closed(raw)
    _reply_after(hardy_server, evil)
    _reply_after(hardy_server, _prefix(len(evil), 0) + evil)
    # 2. As bytes inside a well-formed call: it arrives as bytes and stays bytes.
    assert hardy_client.echo(evil) == evil
    # 3. The sender refuses the object itself.
    with pytest.raises(TypeError):
        hardy_client.echo(_CreatesAFile(str(target)))
    assert not target.exists()
    assert not os.path.exists(str(target))
    assert hardy_client.add(1, 2) == 3


def _valid_call() -> bytes:
    x = np.arange(10, dtype=np.float32)
    encoder = Encoder()
    tree = encoder.encode(x)
    message = pack({"kind": "call", "id": 1, "function": "echo", "args": [tree],
                    "kwargs": {"dict": {}}}, encoder.buffers)  # fmt: skip
    return message.head + b"".join(bytes(p) for p in message.parts)


VALID = _valid_call()


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "lying", "mutated", "random-header"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return VALID[: draw(st.integers(0, len(VALID) - 1))]
    if kind == "lying":
        header_len = draw(st.integers(0, 2**32 - 1))
        body_len = draw(st.integers(0, 2**64 - 1))
        return PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, header_len, body_len) + VALID[PREFIX.size :]
    if kind == "mutated":
        data = bytearray(VALID)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    header = draw(st.binary(max_size=200))
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(header), 0) + header


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=hostile_bytes(), authenticate=st.booleans())
def test_fuzzed_bytes_never_take_the_server_down(
    hardy_server: Server, hardy_client: Client, data: bytes, authenticate: bool
) -> None:
    if authenticate:
        channel = _authenticated_socket(hardy_server)
        sock = channel.sock
    else:
        sock = socket.create_connection(hardy_server.address, timeout=10)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        _read_until_closed(sock)  # the server answers and/or hangs up; it never waits forever
    except OSError:
        pass
    finally:
        sock.close()
    assert hardy_client.add(2, 3) == 5
    assert hardy_client.echo(b"still here") == b"still here"


def test_limits_are_configurable_and_apply_to_the_client_too() -> None:
    with make_server(limits=Limits(max_body_bytes=1000)) as server:
        with Client(*server.address, limits=Limits(max_body_bytes=100)) as client:
            with pytest.raises(ProtocolError, match="over the limit of 1000"):
                client.echo(bytes(5000))  # the server refuses it and hangs up
            with pytest.raises(ProtocolError, match="over the limit of 100"):
                client.echo(bytes(500))  # the server accepts, the client refuses the reply
            assert client.add(1, 2) == 3


def test_struct_layout_is_the_documented_one() -> None:
    prefix = _prefix(3, 5)
    assert prefix == b"SRPC" + struct.pack("<HHIQ", 1, 0, 3, 5)


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (Limits(max_buffers=0), "buffers is over the limit of 0"),
        (Limits(max_ndim=0), "bad array shape"),
        (Limits(max_body_bytes=39), "body of 40 bytes is over the limit of 39"),
    ],
)
def test_one_array_messages_are_checked_against_every_limit(limits: Limits, match: str) -> None:
    # One buffer filling the body is the common message: its shortcut checks the same limits.
    a, b = socket.socketpair()
    with a, b:
        channel = Channel(b, limits)
        a.sendall(VALID)  # one float32 array of 10: a body of 40 bytes
        with pytest.raises(ProtocolError, match=match):
            frame = channel.receive()
            assert frame is not None
            Decoder(frame.buffers, limits).decode(frame.header["args"])
