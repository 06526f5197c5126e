"""Sessions over a chain of parts: a cached forward function ``f(ids, mask) -> logits``.

``Pipeline(["127.0.0.1:5001", "127.0.0.1:5002"]).session(batch_size, max_len)`` and
``LocalModel(directory).session(...)`` give the same :class:`Session`, so the sampler, the CLI
and the HTTP API never know whether the parts sit in this process or on other machines::

    with Pipeline(["127.0.0.1:5001", "127.0.0.1:5002"]) as pipeline:
        with pipeline.session(batch_size=1, max_len=256) as session:
            tokens = llm_sampler.generate(session, [ids], max_new_tokens=32, cached=True)

Failover: a part listed twice (or given in ``spares=``) has a spare. Each step's inputs to such a
part are recorded; when the part fails (:class:`NodeError`), the session opens on the spare,
replays the recorded inputs there (rebuilding the spare's KV cache) and goes on. The record is
bounded: a step a part refused is taken out of it, a batch whose rows have all left starts a
fresh record (the session reopens, empty, on every part), and a record past ``replay_bytes``
is dropped with a warning: that session goes on without failover for that part.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .chain import Chain, check_chain
from .errors import ChainError, NodeError, PartialRunError, SessionError
from .local import LocalLink, load_with_info
from .transport import PartInfo, PartLink

log = logging.getLogger(__name__)

# A session's replay record (the inputs to a part with a spare) is dropped past this many bytes.
DEFAULT_REPLAY_BYTES = 1 << 30


@dataclass(frozen=True)
class LinkTiming:
    """One part's share of a step: ``compute`` (the part's own seconds) and ``transfer`` (the
    rest of the call's wall time: wire, (de)serialisation, queueing)."""

    name: str
    compute: float
    transfer: float


@dataclass(frozen=True)
class StepStats:
    """Timing of one step: ``wall`` seconds in all, each link's share, and ``client`` (wall
    minus the links' calls: this process's own work between them)."""

    step: int
    tokens: int
    wall: float
    links: tuple[LinkTiming, ...]

    @property
    def compute(self) -> float:
        """The parts' summed compute seconds."""
        return sum(t.compute for t in self.links)

    @property
    def transfer(self) -> float:
        """The summed transfer seconds of every hop."""
        return sum(t.transfer for t in self.links)

    @property
    def client(self) -> float:
        """Wall seconds spent outside the links' calls."""
        return self.wall - self.compute - self.transfer


class Session:
    """A KV-cached forward function over a chain of parts; a context manager.

    ``session(ids, mask=None)`` runs one step: ``ids`` ``LongTensor[B, T]`` (``B <= batch_size``)
    and the ``[B, T]`` padding mask (True on real tokens) go through every part in order; returns
    float32 logits ``[B, T, V]`` on the ids' device. With ``cached=False`` every call starts
    from an empty cache (each call opens a fresh session of the call's shape), so the session
    is a stateless forward function, as ``llm_sampler.score_continuations`` needs.

    Made by :meth:`Pipeline.session`; ``stats`` holds the timing of the first step and of the
    last ``STATS_KEPT`` ones (a session serving traffic for days must not grow without bound).
    """

    STATS_KEPT = 4096

    def __init__(
        self,
        links: Sequence[PartLink],
        batch_size: int,
        max_len: int,
        *,
        spares: dict[int, list[PartLink]] | None = None,
        cached: bool = True,
        session_id: str | None = None,
        replay_bytes: int = DEFAULT_REPLAY_BYTES,
    ) -> None:
        self.links = list(links)
        self.batch_size = batch_size
        self.max_len = max_len
        self.cached = cached
        self.id = session_id or uuid.uuid4().hex
        self.stats: list[StepStats] = []
        self.step = 0
        self._spares = {i: list(s) for i, s in (spares or {}).items()}
        self._history: dict[int, list[tuple]] = {i: [] for i in self._spares}
        self._recorded = dict.fromkeys(self._spares, 0)  # bytes of tensors in each record
        self.replay_bytes = replay_bytes
        self._open = False
        self._closed = False
        self._shape = (batch_size, max_len)  # of the sessions open on the parts
        if cached:
            self._open_all(batch_size, max_len)

    def __repr__(self) -> str:
        names = ", ".join(link.name for link in self.links)
        return f"Session({self.id[:8]}, step {self.step}, [{names}])"

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step on the new tokens ``ids`` ``[B, T]``; returns logits ``[B, T, V]``."""
        if self._closed:
            raise SessionError(f"session {self.id} is closed")
        ids, mask = _check_step(ids, mask)
        if not self.cached:
            self._reset(ids.shape[0], ids.shape[1])
        start = time.perf_counter()
        x, timings = ids, []
        for i in range(len(self.links)):
            nbytes = x.nbytes + mask.nbytes
            if i in self._history:
                self._record(i, ("forward", self.step, x, mask), nbytes)
            called = time.perf_counter()
            try:
                x, compute = self._forward(i, x, mask)
            except BaseException:
                if i in self._history:  # the part did not take this step: no replay of it
                    self._history[i].pop()
                    self._recorded[i] -= nbytes
                raise
            wall = time.perf_counter() - called
            timings.append(LinkTiming(self.links[i].name, compute, max(0.0, wall - compute)))
        if x.device != ids.device:  # logits come back where the ids were (e.g. parts on a GPU)
            x = x.to(ids.device)
        wall = time.perf_counter() - start
        self.stats.append(StepStats(self.step, int(ids.shape[1]), wall, tuple(timings)))
        if len(self.stats) > 2 * self.STATS_KEPT:
            del self.stats[1 : len(self.stats) - self.STATS_KEPT]
        self.step += 1
        return x

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only these rows of the batch, in this order, on every part."""
        rows = [int(r) for r in rows]
        if not rows and self.cached and any(self._history.values()):
            # Every row left: the caches are empty, so a fresh session on every part is the
            # same state, and its replay record starts empty instead of growing for ever.
            self._reset(*self._shape)
            return
        for i in range(len(self.links)):
            if i in self._history:
                self._record(i, ("keep_rows", rows), 0)
            self._call(i, "keep_rows", self.id, rows)

    def join(self, other: Session) -> None:
        """Append the rows of ``other`` (a session on the same parts) to this batch; ``other``
        is then closed. Both sessions must be at the same length: the model's cache decides."""
        if len(other.links) != len(self.links):
            raise SessionError("join needs two sessions on the same parts")
        for i, (mine, theirs) in enumerate(zip(self.links, other.links, strict=True)):
            if mine.name == theirs.name:
                continue
            if theirs in self._spares.get(i, []):  # other failed over first: follow it there
                self._move(i, theirs)
            elif mine in other._spares.get(i, []):  # this one did: other follows
                other._move(i, mine)
            else:
                raise SessionError("join needs two sessions on the same parts")
        for i in range(len(self.links)):
            if i in self._history:
                entry = ("join", other.id, other.batch_size, other.max_len,
                         list(other._history.get(i, [])))  # fmt: skip
                self._record(i, entry, other._recorded.get(i, 0))
            self._call(i, "join", self.id, other.id)
        other._open = False
        other._closed = True

    def close(self) -> None:
        """Free the session on every part (errors are logged, not raised); idempotent."""
        if self._open:
            self._close_all()
        self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the parts ------------------------------------------------------------------------

    def _open_all(self, batch_size: int, max_len: int) -> None:
        self._shape = (batch_size, max_len)  # before the opens: a spare taking over uses it
        opened = []
        try:
            for i in range(len(self.links)):
                self._call(i, "open_session", self.id, batch_size, max_len)
                opened.append(i)
        except BaseException:
            for i in opened:
                _quietly(self.links[i], "close_session", self.id)
            raise
        self._open = True

    def _close_all(self) -> None:
        for link in self.links:
            _quietly(link, "close_session", self.id)
        self._open = False

    def _reset(self, batch_size: int, max_len: int) -> None:
        if self._open:
            self._close_all()
        self.id = uuid.uuid4().hex
        self.step = 0
        self._history = {i: [] for i in self._spares}
        self._recorded = dict.fromkeys(self._spares, 0)
        self._open_all(batch_size, max_len)

    def _record(self, i: int, entry: tuple, nbytes: int) -> None:
        """Add ``entry`` to part ``i``'s replay record; past ``replay_bytes``, drop the record
        and the part's spares for this session (failover would need the whole record)."""
        self._recorded[i] += nbytes
        if self._recorded[i] <= self.replay_bytes:
            self._history[i].append(entry)
            return
        log.warning(
            "session %s: the replay record of part %d passed %d bytes; this session goes on "
            "without failover for that part (its spares stay for new sessions)",
            self.id[:8], i, self.replay_bytes,
        )  # fmt: skip
        del self._history[i], self._recorded[i]
        self._spares.pop(i, None)

    def _forward(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        return self._call(i, "forward", self.id, self.step, x, mask)

    def _call(self, i: int, method: str, *args: Any) -> Any:
        """Call ``method`` on link ``i``; on NodeError fail over to a spare, if there is one."""
        while True:
            link = self.links[i]
            try:
                return getattr(link, method)(*args)
            except NodeError as exc:
                if not self._spares.get(i):
                    raise
                log.warning("%s; failing over to spare %s", exc, self._spares[i][0].name)
                self._fail_over(i, exc)
                if method == "forward":  # the replay ran this step too: its output is the answer
                    return self._replayed
                if method in ("keep_rows", "join", "open_session"):
                    return None  # replayed (keep_rows / join are in the history) or opened

    def _fail_over(self, i: int, error: NodeError) -> None:
        """Move part ``i`` to its next spare and rebuild the session's cache there."""
        # The dead link is not told to close the session: it may hang until its timeout again.
        # Should it come back, its idle-session TTL frees the cache.
        while self._spares.get(i):
            spare = self._spares[i].pop(0)
            try:
                self._replayed = self._replay(spare, i)
            except (NodeError, SessionError) as exc:
                log.warning("spare %s cannot take over: %s", spare.name, exc)
                if isinstance(exc, SessionError):
                    _quietly(spare, "close_session", self.id)
                continue
            self.links[i] = spare
            return
        raise error

    def _move(self, i: int, spare: PartLink) -> None:
        """Move part ``i`` to ``spare`` (one of its spares, where the other session of a join
        already is), rebuilding the cache there; the old link's TTL frees the session."""
        self._spares[i].remove(spare)
        try:
            self._replay(spare, i)
        except SessionError:
            _quietly(spare, "close_session", self.id)
            raise
        self.links[i] = spare

    def _replay(self, link: PartLink, i: int) -> Any:
        link.open_session(self.id, *self._shape)
        return _replay_history(link, self.id, self._history.get(i, []))


def _replay_history(link: PartLink, session_id: str, history: list[tuple]) -> Any:
    out = None
    for entry in history:
        if entry[0] == "forward":
            _, step, x, mask = entry
            out = link.forward(session_id, step, x, mask)
        elif entry[0] == "keep_rows":
            link.keep_rows(session_id, entry[1])
        else:
            _, other_id, batch_size, max_len, other_history = entry
            link.open_session(other_id, batch_size, max_len)
            _replay_history(link, other_id, other_history)
            link.join(session_id, other_id)
    return out


def _quietly(link: PartLink, method: str, *args: Any) -> None:
    try:
        getattr(link, method)(*args)
    except PartialRunError as exc:
        log.warning("%s on %s failed: %s", method, link.name, exc)


def _check_step(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SessionError(f"ids must be a LongTensor [B, T], got {_describe(ids)}")
    if mask is None:
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise SessionError(f"mask must be a tensor of the ids' shape {tuple(ids.shape)}, "
                           f"got {_describe(mask)}")  # fmt: skip
    return ids, mask.to(torch.bool)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class Pipeline:
    """A chain of parts reached through links; makes sessions.

    Args:
        nodes: ``"host:port"`` addresses of nodes (or :class:`PartLink` objects), in any order;
            the chain is ordered by the parts' specs. The same part twice: the second is a spare.
        token: the nodes' shared token (for addresses).
        timeout: seconds each call may take before the node is declared dead (NodeError).
        spares: more nodes (addresses or links), each holding the same part as one of ``nodes``.
        ssl_context: a client-side ``ssl.SSLContext`` for TLS nodes.
        replay_bytes: bytes of recorded inputs a session keeps per part with a spare (see the
            module doc); past them that session loses failover for that part.

    Raises:
        NodeError: a node cannot be reached or refuses the token.
        ChainError: the parts do not form one model (checked before any tensor is sent).
    """

    def __init__(
        self,
        nodes: Sequence[str | PartLink],
        *,
        token: str | bytes | None = None,
        timeout: float = 60.0,
        spares: Sequence[str | PartLink] = (),
        ssl_context: Any = None,
        replay_bytes: int = DEFAULT_REPLAY_BYTES,
    ) -> None:
        self._owned: list[PartLink] = []
        self.replay_bytes = replay_bytes
        _check_distinct([*nodes, *spares])
        try:
            primary = [self._link(n, token, timeout, ssl_context) for n in nodes]
            extra = [self._link(n, token, timeout, ssl_context) for n in spares]
            self.chain: Chain = check_chain(
                [(link, link.info()) for link in primary],
                [(link, link.info()) for link in extra],
            )
        except BaseException:
            self.close()
            raise

    def _link(self, node: str | PartLink, token: Any, timeout: float, ssl_context: Any) -> PartLink:
        if isinstance(node, str):
            from .remote import RemoteLink

            link = RemoteLink(node, token=token, timeout=timeout, ssl_context=ssl_context)
            self._owned.append(link)
            return link
        if not isinstance(node, PartLink):
            raise PartialRunError(f"a node is a 'host:port' string or a PartLink, got {node!r}")
        return node

    @property
    def links(self) -> list[PartLink]:
        """The parts in chain order (begin first)."""
        return self.chain.links

    @property
    def infos(self) -> list[PartInfo]:
        """The parts' info, in chain order."""
        return self.chain.infos

    def session(self, batch_size: int = 1, max_len: int = 1024, *, cached: bool = True) -> Session:
        """A new session of up to ``batch_size`` rows and ``max_len`` positions on every part."""
        return Session(
            self.chain.links, batch_size, max_len, spares=self.chain.spares, cached=cached,
            replay_bytes=self.replay_bytes,
        )  # fmt: skip

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files of the model, from the first part that has them ({} if none)."""
        for link in self.chain.links:
            get = getattr(link, "tokenizer_files", None)
            if get is not None:
                found = get()
                if found:
                    return found
        return {}

    def close(self) -> None:
        """Close the links this pipeline opened (the nodes keep running)."""
        for link in self._owned:
            link.close()
        self._owned.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_distinct(nodes: Sequence[str | PartLink]) -> None:
    from .remote import parse_address

    seen: set[tuple[str, int]] = set()
    for node in nodes:
        if isinstance(node, str):
            address = parse_address(node)
            if address in seen:
                raise ChainError(f"node {node} is listed twice: a spare must be another node")
            seen.add(address)


class LocalModel(Pipeline):
    """The session interface over parts in this process: no sockets.

    ``LocalModel(directory)`` loads the whole model; ``specs=["b 0-15", "15-30 e"]`` loads it as
    those parts (e.g. on ``devices=["cuda:0", "cuda:1"]``). ``resident_layers=K`` streams each
    part's layers, at most K on the device at once (from packed layer files kept in
    ``packed_dir``, made once; ``pack=False``: from the model's own files). Or give loaded parts:
    ``LocalModel.from_parts``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        specs: Sequence[str] = ("f",),
        *,
        device: str | torch.device | None = None,
        devices: Sequence[str | torch.device | None] | None = None,
        dtype: str | torch.dtype | None = None,
        verify: bool = False,
        pack: bool = True,
        resident_layers: int | None = None,
        packed_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        devices = list(devices) if devices is not None else [device] * len(specs)
        if len(devices) != len(specs):
            raise PartialRunError(f"{len(devices)} devices for {len(specs)} specs")
        self.directory = directory
        links = []
        for spec, dev in zip(specs, devices, strict=True):
            part, info = load_with_info(directory, spec, device=dev, dtype=dtype, pack=pack,
                                        verify=verify, resident_layers=resident_layers,
                                        packed_dir=packed_dir)  # fmt: skip
            links.append(LocalLink(part, info=info))
        super().__init__(links)

    def close(self) -> None:
        """Close every session and the parts' loader threads (streamed parts); the model is
        unusable afterwards."""
        super().close()
        for link in self.chain.links if hasattr(self, "chain") else []:
            link.close()
            close_part = getattr(link.part, "close", None)
            if close_part is not None:
                close_part()

    @classmethod
    def from_parts(cls, parts: Sequence[Any]) -> Pipeline:
        """A pipeline over parts already loaded in this process."""
        return Pipeline([LocalLink(part) for part in parts])

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer files stored in the directory."""
        from .node import read_tokenizer_files

        return read_tokenizer_files(self.directory)
