"""Server and client behaviour: errors, exposure, timeouts, restarts, dead servers, threads."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
from typing import Any

import numpy as np
import pytest
import torch

from socket_rpc import (
    Client,
    RemoteError,
    RPCConnectionError,
    RPCTimeoutError,
    Server,
    SocketRPCError,
    UnknownFunctionError,
    exposed,
)

from .conftest import Calls, make_server


def test_results_come_back_and_one_connection_carries_many_calls(
    client: Client, server: Server
) -> None:
    assert client.add(2, 3) == 5
    assert client.call("add", "a", "b") == "ab"
    assert client.call("echo", None) is None
    for i in range(50):
        assert client.add(i, 1) == i + 1
    assert len(client._idle) == 1 and len(server._connections) == 1


def test_remote_exception_carries_type_message_and_traceback(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.fail("no such layer 7")
    error = info.value
    assert error.type_name == "ValueError"
    assert error.remote_message == "no such layer 7"
    assert "Traceback" in error.remote_traceback and "def fail" not in error.remote_traceback
    assert "in fail" in error.remote_traceback and "raise ValueError" in error.remote_traceback
    assert "no such layer 7" in str(error)
    assert client.add(1, 1) == 2  # the connection survives a remote error


def test_wrong_arguments_are_a_remote_type_error(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.add(1)
    assert info.value.type_name == "TypeError"


def test_unknown_function_names_what_is_exposed(client: Client) -> None:
    with pytest.raises(UnknownFunctionError) as info:
        client.call("os.system", "touch /tmp/x")
    assert isinstance(info.value, RemoteError)
    assert "'os.system'" in str(info.value) and "echo" in str(info.value)
    with pytest.raises(UnknownFunctionError):
        client.no_such_function()
    with pytest.raises(UnknownFunctionError):
        client.call("__init__")


def test_only_explicitly_exposed_callables_are_served() -> None:
    class Node:
        def __init__(self) -> None:
            self.sessions: dict[str, int] = {}

        @exposed
        def open_session(self, session_id: str, batch_size: int) -> None:
            self.sessions[session_id] = batch_size

        @exposed(name="info")
        def describe(self) -> dict[str, Any]:
            return {"sessions": sorted(self.sessions)}

        def secret(self) -> str:
            return "never"

    node = Node()
    server = Server()
    assert server.expose_object(node) == ["info", "open_session"]
    with server, Client(*server.address) as client:
        client.open_session("s1", batch_size=2)
        assert client.info() == {"sessions": ["s1"]}
        for name in ("secret", "describe", "sessions", "__class__", "__dict__"):
            with pytest.raises(UnknownFunctionError):
                client.call(name)
    empty = Server()
    with pytest.raises(ValueError):
        empty.expose_object(object())
    empty.close()


def test_expose_refuses_duplicates_and_non_callables() -> None:
    server = Server()
    server.expose(len)
    with pytest.raises(ValueError):
        server.expose(len)
    with pytest.raises(TypeError):
        server.expose(42, name="answer")  # type: ignore[call-overload]
    server.close()


def test_binds_loopback_by_default() -> None:
    server = Server()
    assert server.address[0] == "127.0.0.1"
    server.close()


def _has_ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("host", ["::1", "::"])
def test_serves_on_ipv6(host: str) -> None:
    """An IPv6 host binds an IPv6 socket (not the IPv4 default); "::" also serves IPv4 where
    the system allows both on one socket."""
    with make_server(host=host) as server:
        port = server.address[1]
        assert ":" in server.address[0]
        with Client("::1", port) as client:
            assert client.call("add", 2, 3) == 5
        if host == "::" and socket.has_dualstack_ipv6():
            with Client("127.0.0.1", port) as client:
                assert client.call("add", 4, 3) == 7


def test_proxy_does_not_turn_private_names_into_calls(client: Client) -> None:
    with pytest.raises(AttributeError):
        client._private  # noqa: B018
    assert client.echo.name == "echo"


def test_call_timeout_raises_a_timeout_error_and_the_client_recovers(
    client: Client, calls: Calls
) -> None:
    with pytest.raises(RPCTimeoutError) as info:
        client.call_with_timeout(0.2, "wait_for_release")
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, SocketRPCError)
    assert calls.entered.is_set()
    calls.release.set()
    assert client.add(1, 2) == 3  # a fresh connection; the timed-out one was dropped


def test_client_wide_timeout(server: Server, calls: Calls) -> None:
    with Client(*server.address, timeout=0.2) as client:
        with pytest.raises(TimeoutError):
            client.wait_for_release()


def test_connect_timeout_when_the_peer_never_answers() -> None:
    # A listening socket nobody accepts from: TCP connects, the handshake never comes.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(RPCTimeoutError):
            Client(*silent.getsockname(), connect_timeout=0.3)
    finally:
        silent.close()


def test_connecting_to_nothing_is_a_connection_error() -> None:
    port = socket.create_server(("127.0.0.1", 0))
    address = port.getsockname()
    port.close()
    with pytest.raises(RPCConnectionError) as info:
        Client(*address)
    assert isinstance(info.value, ConnectionError)
    lazy = Client(*address, connect=False)
    with pytest.raises(RPCConnectionError):
        lazy.echo(1)


def test_client_reconnects_after_the_server_restarts() -> None:
    first = make_server().start()
    host, port = first.address
    client = Client(host, port, timeout=30)
    assert client.add(1, 2) == 3
    first.close()
    with pytest.raises(RPCConnectionError):
        client.add(1, 2)  # nothing listens now
    second = make_server(port=port).start()
    try:
        assert client.add(2, 2) == 4
        assert client.echo(np.arange(3)).tolist() == [0, 1, 2]
    finally:
        client.close()
        second.close()


def test_client_notices_a_server_that_closed_the_idle_connection() -> None:
    server = make_server().start()
    host, port = server.address
    with Client(host, port, timeout=30) as client:
        assert client.add(1, 2) == 3
        server.close()
        replacement = make_server(port=port).start()
        try:
            assert client.add(3, 4) == 7  # the stale idle connection was replaced, not used
        finally:
            replacement.close()


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from socket_rpc import Server
    server = Server()

    @server.expose
    def hang():
        print("in-call", flush=True)
        threading.Event().wait()

    server.start()
    print(server.address[1], flush=True)
    sys.stdin.read()
    """
)


def test_server_killed_mid_call_makes_the_client_raise_not_hang() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(child.stdout.readline())
        client = Client("127.0.0.1", port, timeout=60)
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                client.hang()
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert child.stdout.readline().strip() == "in-call"
        child.kill()
        caller.join(30)
        assert not caller.is_alive(), "the client hung after the server died"
        assert len(outcome) == 1 and isinstance(outcome[0], RPCConnectionError), outcome
        assert f"127.0.0.1:{port}" in str(outcome[0])  # the error names the server
        client.close()
    finally:
        child.kill()
        child.communicate()


def test_sixteen_threads_share_one_client(client: Client, server: Server) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(200):
                if i % 20 == 0:
                    x = torch.full((k + 1, 3), float(i))
                    assert torch.equal(client.echo(x), x)
                else:
                    assert client.add(k * 1000, i) == k * 1000 + i
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_serve_forever_runs_until_closed_from_another_thread() -> None:
    server = make_server()
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    with Client(*server.address) as client:
        assert client.add(5, 5) == 10
        server.close()
        runner.join(10)
        assert not runner.is_alive()
        with pytest.raises(RPCConnectionError):
            client.add(1, 1)


def test_close_ends_open_connections_and_is_idempotent(server: Server) -> None:
    clients = [Client(*server.address) for _ in range(3)]
    for c in clients:
        assert c.add(1, 1) == 2
    server.close()
    server.close()
    assert server._connections == {}
    for c in clients:
        c.close()
    with pytest.raises(RuntimeError):
        server.start()


def test_closed_client_refuses_calls(server: Server) -> None:
    client = Client(*server.address)
    client.close()
    with pytest.raises(RPCConnectionError):
        client.add(1, 2)


def test_connections_over_the_limit_are_refused_and_the_others_served() -> None:
    with make_server(max_connections=1) as server, Client(*server.address) as first:
        assert first.add(1, 1) == 2
        with pytest.raises(RPCConnectionError, match="connection limit"):
            Client(*server.address, connect_timeout=10)
        assert first.add(2, 2) == 4
