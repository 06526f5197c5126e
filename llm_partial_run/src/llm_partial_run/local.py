"""A part in this process behind the :class:`~llm_partial_run.transport.PartLink` interface.

:class:`LocalLink` holds the sessions of one part: a KV cache each, step numbers, a time-to-live
and caps on sessions and cache bytes. A node (:mod:`llm_partial_run.node`) is a LocalLink served
over socket_rpc, so the session rules are written once and hold the same in one process and
over the network.

Concurrency: the session table has one lock; each session has its own, so one session runs one
step at a time while different sessions run at the same time (torch releases the GIL).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_sepweight import architectures, read_manifest

from . import parts
from .errors import SessionError
from .transport import PartInfo

log = logging.getLogger(__name__)


@dataclass
class _Session:
    batch_size: int
    max_len: int
    nbytes: int
    last_used: float
    cache: Any = None
    next_step: int = 0
    last: tuple[torch.Tensor, float] | None = None  # the output of step next_step - 1
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalLink:
    """A :class:`~llm_partial_run.transport.PartLink` over ``part`` in this process.

    Args:
        part: a loaded part (``load_any_part``) or anything with its surface (``spec``,
            ``config``, ``dtype``, ``device``, ``new_cache``, ``__call__(x, mask, cache)``).
        info: what :meth:`info` returns; by default derived from the part.
        name: how errors name this part (default ``"local <spec>"``).
        max_sessions: sessions open at once, at most (None: no cap).
        max_cache_bytes: KV-cache bytes of all open sessions, at most (None: no cap); a session
            that would exceed it is refused before its cache is allocated.
        session_ttl: seconds a session may stay idle before it is freed (None: forever).
        clock: the time source of the TTL (tests pass a fake one).
    """

    def __init__(
        self,
        part: Any,
        *,
        info: PartInfo | None = None,
        name: str | None = None,
        max_sessions: int | None = None,
        max_cache_bytes: int | None = None,
        session_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.part = part
        self._info = info or part_info(part)
        self.name = name or f"local {self._info.spec}"
        self.max_sessions = max_sessions
        self.max_cache_bytes = max_cache_bytes
        self.session_ttl = session_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._expired: deque[str] = deque(maxlen=4096)

    def __repr__(self) -> str:
        return f"LocalLink({self.name!r})"

    # ---- PartLink -------------------------------------------------------------------------

    def info(self) -> PartInfo:
        """The part's architecture, spec, layer count, dtype and device."""
        return self._info

    def open_session(self, session_id: str, batch_size: int, max_len: int) -> None:
        """Make the session's KV cache; refused (SessionError) past the caps, before allocating."""
        _check_id(self.name, session_id)
        for arg, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SessionError(f"{self.name}: {arg} must be an int >= 1, got {value!r}")
        need = parts.cache_bytes(self.part, batch_size, max_len)
        with self._lock:
            self._expire_locked()
            if session_id in self._sessions:
                raise SessionError(f"{self.name}: session {session_id!r} is already open")
            if self.max_sessions is not None and len(self._sessions) >= self.max_sessions:
                raise SessionError(
                    f"{self.name}: {len(self._sessions)} sessions are open, the cap is "
                    f"{self.max_sessions}; close one or wait for idle ones to expire"
                )
            used = sum(s.nbytes for s in self._sessions.values())
            if self.max_cache_bytes is not None and used + need > self.max_cache_bytes:
                raise SessionError(
                    f"{self.name}: a cache of batch {batch_size} x {max_len} positions needs "
                    f"{need} bytes; {used} of the cap of {self.max_cache_bytes} are in use"
                )
            session = _Session(batch_size, max_len, need, self._clock())
            session.lock.acquire()  # held until the cache exists: no step runs on a half session
            self._sessions[session_id] = session
        try:
            session.cache = self.part.new_cache(batch_size, max_len)
        except Exception as exc:
            with self._lock:
                self._sessions.pop(session_id, None)
            raise SessionError(f"{self.name}: cannot make a cache of {need} bytes: {exc}") from exc
        finally:
            session.lock.release()
        log.debug("%s: opened session %s (%d x %d, %d bytes)", self.name, session_id,
                  batch_size, max_len, need)  # fmt: skip

    def forward(
        self, session_id: str, step: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]:
        """Run step ``step`` of the session; a repeat of the last step returns its output again."""
        session = self._session(session_id)
        with session.lock:
            self._check_open(session_id, session)
            session.last_used = self._clock()
            if step == session.next_step - 1 and session.last is not None:
                return session.last
            if step != session.next_step:
                raise SessionError(
                    f"{self.name}: session {session_id!r} expects step {session.next_step}, "
                    f"got {step} (steps run in order; only the last one may be repeated)"
                )
            start = time.perf_counter()
            with torch.no_grad():
                out = self.part(_to(x, self.part.device), _to(mask, self.part.device),
                                session.cache)  # fmt: skip
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            session.last = (out, time.perf_counter() - start)
            session.next_step += 1
            session.last_used = self._clock()
            return session.last

    def close_session(self, session_id: str) -> None:
        """Free the session's cache; unknown ids are ignored."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            with session.lock:
                session.cache = session.last = None

    def keep_rows(self, session_id: str, rows: list[int]) -> None:
        """Keep only these rows of the session's batch, in this order."""
        if not isinstance(rows, (list, tuple)) or not all(_is_int(r) for r in rows):
            raise SessionError(f"{self.name}: rows must be a list of ints, got {rows!r}")
        session = self._session(session_id)
        with session.lock:
            self._check_open(session_id, session)
            parts.keep_rows(session.cache, list(rows))
            session.last = None  # the last step's output no longer matches the rows

    def join(self, session_id: str, other_session_id: str) -> None:
        """Append the rows of ``other_session_id`` to ``session_id``; the other is then closed."""
        if session_id == other_session_id:
            raise SessionError(f"{self.name}: cannot join session {session_id!r} to itself")
        session = self._session(session_id)
        other = self._session(other_session_id)
        first, second = sorted((session, other), key=id)  # one order: joins never deadlock
        with first.lock, second.lock:
            self._check_open(session_id, session)
            self._check_open(other_session_id, other)
            parts.join(session.cache, other.cache)
            session.last = None
        with self._lock:
            self._sessions.pop(other_session_id, None)
        with other.lock:
            other.cache = other.last = None

    def close(self) -> None:
        """Close every session (the part stays loaded)."""
        with self._lock:
            ids = list(self._sessions)
        for session_id in ids:
            self.close_session(session_id)

    # ---- bookkeeping ----------------------------------------------------------------------

    def expire(self) -> list[str]:
        """Free sessions idle for longer than the TTL; returns their ids."""
        with self._lock:
            return self._expire_locked()

    def stats(self) -> dict[str, int]:
        """Open sessions and the cache bytes they hold."""
        with self._lock:
            return {
                "sessions": len(self._sessions),
                "cache_bytes": sum(s.nbytes for s in self._sessions.values()),
            }

    def _expire_locked(self) -> list[str]:
        if self.session_ttl is None:
            return []
        now = self._clock()
        gone = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_used > self.session_ttl and not s.lock.locked()
        ]
        for sid in gone:
            session = self._sessions.pop(sid)
            session.cache = session.last = None
            self._expired.append(sid)
            log.info("%s: session %s expired after %.0f s idle", self.name, sid, self.session_ttl)
        return gone

    def _check_open(self, session_id: str, session: _Session) -> None:
        if session.cache is None:  # closed, expired or joined while we waited for its lock
            raise SessionError(f"{self.name}: session {session_id!r} is closed")

    def _session(self, session_id: str) -> _Session:
        with self._lock:
            self._expire_locked()
            session = self._sessions.get(session_id)
            if session is not None:
                return session
            if session_id in self._expired:
                raise SessionError(
                    f"{self.name}: session {session_id!r} expired (idle longer than "
                    f"{self.session_ttl} s) and was freed"
                )
        raise SessionError(f"{self.name}: no open session {session_id!r}")


def part_info(
    part: Any, *, arch: str | None = None, model: str = "", fingerprint: str = ""
) -> PartInfo:
    """The :class:`PartInfo` of a loaded part (``arch`` found from its package when not given;
    ``fingerprint``: :func:`llm_partial_run.parts.fingerprint` of its manifest)."""
    config = part.config
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        num_layers = config.num_layers
    return PartInfo(
        arch=arch or _arch_of(part),
        spec=str(part.spec),
        num_layers=int(num_layers),
        dtype=parts.dtype_name(part.dtype),
        device=str(part.device),
        model=model,
        resident_layers=getattr(part, "resident_layers", None),
        fingerprint=fingerprint,
    )


def load_with_info(
    directory: str | os.PathLike[str], spec: Any, **load: Any
) -> tuple[Any, PartInfo]:
    """:func:`~llm_partial_run.parts.load_any_part` ``(directory, spec, **load)`` and the part's
    :class:`PartInfo`: the manifest's arch, the directory's name as the model, and the weights'
    fingerprint, on which chains are checked (copies of a model under other names still chain,
    different weights under one name do not)."""
    manifest = read_manifest(directory)
    part = parts.load_any_part(directory, spec, **load)
    model = os.path.basename(os.path.normpath(directory))
    info = part_info(part, arch=manifest.arch, model=model, fingerprint=parts.fingerprint(manifest))
    return part, info


def _arch_of(part: Any) -> str:
    package = type(part).__module__.split(".")[0]
    for arch in architectures():
        if arch.load_part is not None and arch.load_part.__module__.split(".")[0] == package:
            return arch.name
    return package


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t if t is None or t.device == device else t.to(device)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_id(name: str, session_id: object) -> None:
    if not isinstance(session_id, str) or not session_id or len(session_id) > 128:
        raise SessionError(f"{name}: a session id is a string of 1-128 chars, got {session_id!r}")
