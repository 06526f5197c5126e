"""Fixtures for the socket_rpc tests: a real server on 127.0.0.1 (a free port) and a client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from socket_rpc import Client, Server


class Calls:
    """What the test server's functions saw (so tests can prove a function did or did not run)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.entered = threading.Event()

    def hit(self) -> None:
        with self.lock:
            self.count += 1


def make_server(calls: Calls | None = None, **kwargs: Any) -> Server:
    """A server exposing the functions the tests call; not started."""
    calls = calls or Calls()
    server = Server(**kwargs)

    @server.expose
    def echo(*args: Any, **kw: Any) -> Any:
        calls.hit()
        if kw:
            return list(args), kw
        return args[0] if len(args) == 1 else args

    @server.expose(name="add")
    def add_numbers(a: Any, b: Any) -> Any:
        calls.hit()
        return a + b

    @server.expose
    def fail(message: str) -> None:
        calls.hit()
        raise ValueError(message)

    @server.expose
    def wait_for_release() -> str:
        calls.entered.set()
        calls.release.wait(30)
        return "released"

    @server.expose
    def unsendable() -> Any:
        return object()

    @server.expose
    def count() -> int:
        return calls.count

    return server


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def server(calls: Calls) -> Iterator[Server]:
    with make_server(calls) as running:
        try:
            yield running
        finally:
            calls.release.set()  # let a call still waiting end before the server closes


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(*server.address, timeout=60) as connected:
        yield connected
