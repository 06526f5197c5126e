"""Fixtures for the socket_rpc tests: a real server on 127.0.0.1 (a free port) and a client."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
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


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (made with openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the TLS tests need the openssl command-line tool to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return cert, key


def tls_contexts(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with the test certificate and a client context that trusts it."""
    cert, key = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    return server_context, client_context
