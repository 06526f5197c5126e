"""A node: one part of a model served over socket_rpc to the pipelines that chain it.

    node = Node("smollm2-sw", "b 0-15")                 # verifies the part's files, loads it
    with node.listen(port=5001) as server:              # a socket_rpc Server, started
        ...

or, blocking until SIGINT/SIGTERM, ``serve("smollm2-sw", "b 0-15", port=5001)`` (what
``llm-partial-run serve`` runs). The calls are those of the node protocol (docs/architecture.md):
``info``, ``open_session``, ``forward``, ``close_session``, ``keep_rows``, ``join`` and
``tokenizer_files``. Session rules (steps, TTL, caps) live in :class:`~.local.LocalLink`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from socket_rpc import Limits, Server, exposed

from .local import LocalLink, load_with_info

log = logging.getLogger(__name__)


def read_tokenizer_files(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """The tokenizer files stored in a sepweight directory, name -> bytes ({} if none)."""
    from .text import Tokenizer

    return Tokenizer.read_files(directory)


def default_cache_budget(device: torch.device | str) -> int:
    """KV-cache bytes a node allows all its sessions together unless told otherwise.

    Nine tenths of the memory free on the device now (CUDA: ``mem_get_info``; CPU: the kernel's
    MemAvailable, or half the physical memory where that cannot be read), so a cache that would
    not fit is refused before it is allocated instead of getting the node killed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.9)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(int(fields["MemAvailable"].split()[0]) * 1024 * 0.9)
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class Node:
    """One part of a model and its sessions, with the node protocol's calls exposed.

    Args:
        directory: the sepweight directory.
        part: the part spec to serve (``"b 0-15"``, ``"15-30 e"``, ``"f"``).
        device, dtype: where and in which dtype to hold the part (default: CPU, stored dtype).
        verify: re-hash the part's files against the manifest before loading (default True).
        resident_layers: stream the layers' weights, at most this many on the device at once.
        max_sessions, max_cache_bytes, session_ttl: the session caps and idle time-to-live.
            ``max_cache_bytes`` None means :func:`default_cache_budget` of the part's device, so
            a client can never ask a node for more cache than the machine holds.
        pack: let the model package repack weights for speed (one copy at load); a streamed
            part streams packed layer files (made once), ``pack=False`` the model's own files.
        packed_dir: where a streamed part keeps its packed layer files (default
            ``~/.cache/llm_microlibs/packed``).

    Raises:
        llm_sepweight.IntegrityError: a file of the part does not match the manifest.
        llm_sepweight.SepweightError: a bad directory or spec.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        part: str = "f",
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        verify: bool = True,
        resident_layers: int | None = None,
        max_sessions: int | None = 64,
        max_cache_bytes: int | None = None,
        session_ttl: float | None = 600.0,
        pack: bool = True,
        packed_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        loaded, info = load_with_info(self.directory, part, device=device, dtype=dtype,
                                      pack=pack, verify=verify, resident_layers=resident_layers,
                                      packed_dir=packed_dir)  # fmt: skip
        if max_cache_bytes is None:
            max_cache_bytes = default_cache_budget(loaded.device)
        self.link = LocalLink(
            loaded, info=info, name=f"part {info.spec}", max_sessions=max_sessions,
            max_cache_bytes=max_cache_bytes, session_ttl=session_ttl,
        )  # fmt: skip
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # ---- the node protocol ----------------------------------------------------------------

    @exposed
    def info(self) -> dict[str, Any]:
        """The part: arch, spec, num_layers, dtype, device, protocol, model."""
        return self.link.info().to_dict()

    @exposed
    def open_session(self, session_id: str, batch_size: int, max_len: int) -> None:
        """Make a KV cache for the session (refused past the caps, before allocating)."""
        self.link.open_session(session_id, batch_size, max_len)

    @exposed
    def forward(
        self, session_id: str, step: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]:
        """Run one step; returns the output (on the CPU) and the compute seconds."""
        out, compute = self.link.forward(session_id, step, x, mask)
        return out, compute

    @exposed
    def close_session(self, session_id: str) -> None:
        """Free the session (unknown ids are ignored)."""
        self.link.close_session(session_id)

    @exposed
    def keep_rows(self, session_id: str, rows: list[int]) -> None:
        """Keep only these rows of the session's batch."""
        self.link.keep_rows(session_id, rows)

    @exposed
    def join(self, session_id: str, other_session_id: str) -> None:
        """Append the other session's rows to this session's batch."""
        self.link.join(session_id, other_session_id)

    @exposed
    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files of the model (for a client that has no copy)."""
        return read_tokenizer_files(self.directory)

    @exposed
    def stats(self) -> dict[str, int]:
        """Open sessions and the cache bytes they hold."""
        return self.link.stats()

    # ---- serving --------------------------------------------------------------------------

    def listen(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
    ) -> Server:
        """A started socket_rpc Server exposing this node (close it, or use it in ``with``).

        Warns (logging) when ``host`` is not loopback and no token is set.
        """
        if token is None and not _is_loopback(host):
            log.warning(
                "serving %s without a token: anyone who can reach the port can use this node "
                "(give a token, and TLS off this machine)", host,
            )  # fmt: skip
        server = Server(host, port, token=token, ssl_context=ssl_context, limits=limits)
        server.expose_object(self)
        self._start_reaper()
        server.start()
        return server

    def _start_reaper(self) -> None:
        if self._reaper is not None or self.link.session_ttl is None:
            return
        period = max(0.05, min(30.0, self.link.session_ttl / 4))

        def reap() -> None:
            while not self._stop.wait(period):
                self.link.expire()

        self._reaper = threading.Thread(target=reap, name="node-session-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        """Stop the TTL thread and free every session."""
        self._stop.set()
        if self._reaper is not None and self._reaper is not threading.current_thread():
            # joined, not left as a daemon: a daemon thread woken during interpreter shutdown
            # is unwound by pthread_exit, which aborts the process ("terminate called ...")
            self._reaper.join(5.0)
        self.link.close()
        close_part = getattr(self.link.part, "close", None)  # a streamed part's loader thread
        if close_part is not None:
            close_part()


def serve(
    directory: str | os.PathLike[str],
    part: str = "f",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | bytes | None = None,
    ssl_context: ssl.SSLContext | None = None,
    on_ready: Callable[[tuple[str, int]], None] | None = None,
    **node_args: Any,
) -> None:
    """Load the node and serve it until SIGINT or SIGTERM (or KeyboardInterrupt); then close
    every connection and session. ``on_ready(address)`` is called once it accepts calls.

    ``node_args`` go to :class:`Node` (device, dtype, verify, resident_layers, caps, TTL).
    """
    node = Node(directory, part, **node_args)
    server = node.listen(host, port, token=token, ssl_context=ssl_context)
    done = threading.Event()
    previous = {}

    def stop(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    try:
        if on_ready is not None:
            on_ready(server.address)
        while not done.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        node.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
