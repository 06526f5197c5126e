"""socket_rpc is standard library only at import time: numpy and torch load only when needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_loads_neither_numpy_nor_torch() -> None:
    out = _run(
        """
        import sys
        import socket_rpc
        print(sorted(m for m in ("numpy", "torch") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_plain_values_travel_without_importing_numpy_or_torch() -> None:
    out = _run(
        """
        import sys
        from socket_rpc import Client, Server
        server = Server()
        server.expose(lambda x: x, name="echo")
        with server, Client(*server.address) as client:
            value = {"a": [1, 2.5, None, True], "b": (b"raw", "text")}
            assert client.echo(value) == value
        print(sorted(m for m in ("numpy", "torch") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_a_received_tensor_imports_torch_lazily() -> None:
    out = _run(
        """
        import subprocess, sys
        from socket_rpc import Client, Server
        server = Server()
        server.expose(lambda x: x, name="echo")
        @server.expose
        def make():
            import torch
            return torch.arange(3, dtype=torch.bfloat16)
        with server, Client(*server.address) as client:
            before = "torch" in sys.modules
            value = client.make()
        print(before, type(value).__module__, value.dtype)
        """
    )
    assert out == "False torch torch.bfloat16"
