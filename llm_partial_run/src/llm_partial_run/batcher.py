"""Continuous batching: requests in flight share the model's decode steps.

One background thread holds a running batch session (``source.session(max_rows, max_len)``) and
decodes every row in it with one forward call per step. A new request is prefilled in its own
session (its prompts left-padded into one batch), samples its first token there, and then joins
the running batch (``Session.join``); a row that finishes -- end-of-sequence id, stop string,
``max_tokens``, cancelled -- leaves it (``Session.keep_rows``). Each row has its own sampler
(temperature, top-p, seed) and its own text decoder, so what a request gets does not depend on
what else runs beside it.

The batch's KV cache is right-aligned (rows that joined later get padding slots on the left) and
drops leading slots no row uses when rows leave. The batcher follows the same arithmetic to admit
a request only when every row in the batch can still reach its ``max_tokens`` within
``max_len``; otherwise the request waits (first come, first served) until rows leave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from llm_sampler import SamplingConfig, make_sampler

from .errors import PartialRunError
from .text import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)


class BusyError(PartialRunError):
    """The batcher holds as many rows, running and waiting, as it may: try again later."""


class Session(Protocol):
    """What the batcher needs of a session (:class:`llm_partial_run.session.Session`)."""

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...
    def keep_rows(self, rows: Sequence[int]) -> None: ...
    def join(self, other: Any) -> None: ...
    def close(self) -> None: ...


class SessionSource(Protocol):
    """Anything with ``session(batch_size, max_len)``: a Pipeline, a LocalModel."""

    def session(self, batch_size: int, max_len: int) -> Session: ...


@dataclass(frozen=True)
class Settings:
    """How one request generates: the same for each of its rows.

    ``stop`` strings end a row (the text before the first one is kept); ``stop_token_ids`` end
    it too (the id counts as generated, its text is not shown). A ``seed`` makes sampling
    reproducible; choice ``i`` of a request uses ``seed + i``.
    """

    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


class Event(NamedTuple):
    """What a request hears about one of its choices: new ``text`` (possibly empty), and when
    the choice ends its ``finish_reason`` (``"stop"`` or ``"length"``) and ``tokens`` generated."""

    index: int
    text: str
    finish_reason: str | None
    tokens: int


class Job:
    """One request: ``prompts`` (token ids) times ``n`` choices, choice ``p * n + j`` for prompt
    ``p``. ``on_event`` is called from the batcher's thread with an :class:`Event` or, when the
    request failed, with the exception; it must not block."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        settings: Settings,
        on_event: Callable[[Event | BaseException], None],
        *,
        n: int = 1,
    ) -> None:
        self.prompts = [list(p) for p in prompts]
        self.settings = settings
        self.n = n
        self.on_event = on_event
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    @property
    def rows(self) -> int:
        """Rows this job takes in the batch."""
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """Stop generating (the client went away): its rows leave at the next step."""
        self.cancelled.set()

    def _emit(self, event: Event | BaseException) -> None:
        try:
            self.on_event(event)
        except Exception:  # a broken listener must not stop the batch
            log.exception("a request's listener failed; cancelling it")
            self.cancel()


class _Row:
    """One choice being generated: its sampler, text decoder and stop-string hold-back."""

    def __init__(self, job: Job, index: int, prompt: list[int], decoder: IncrementalDecoder):
        s = job.settings
        self.job, self.index, self.prompt_len = job, index, len(prompt)
        self.extent = len(prompt)  # cache slots from this row's first real token to the end
        self.generated = 0
        self.last = -1
        self.finished: str | None = None
        self.decoder = decoder
        self.pending = ""  # decoded text held back: it may be the start of a stop string
        self.sample = None
        if not s.sampling.greedy or s.sampling.repetition_penalty != 1.0:
            seed = None if s.seed is None else s.seed + index
            self.sample = make_sampler(s.sampling, seed=seed)
            self.history = torch.empty(1, len(prompt) + s.max_tokens, dtype=torch.long)
            self.history[0, : len(prompt)] = torch.tensor(prompt)

    @property
    def remaining(self) -> int:
        """Decode steps this row may still need."""
        return self.job.settings.max_tokens - self.generated

    def choose(self, logits: torch.Tensor, greedy: int) -> int:
        """The next token from this row's logits ``[V]`` (``greedy`` is their argmax)."""
        if self.sample is None:
            return greedy
        length = self.prompt_len + self.generated
        return int(self.sample(self.history[:, :length], logits[None])[0])

    def accept(self, token: int) -> Event:
        """Take the chosen token; return the text it makes final and whether the row ended."""
        s = self.job.settings
        self.last = token
        if self.sample is not None:
            self.history[0, self.prompt_len + self.generated] = token
        self.generated += 1
        if token in s.stop_token_ids:
            return self._finish("stop", self.decoder.flush())
        piece = self.decoder.add(token)
        if self.generated >= s.max_tokens:
            return self._finish("length", piece + self.decoder.flush())
        if not s.stop:
            return Event(self.index, piece, None, self.generated)
        self.pending += piece
        cut = _first_stop(self.pending, s.stop)
        if cut is not None:
            self.pending, text = "", self.pending[:cut]
            self.finished = "stop"
            return Event(self.index, text, "stop", self.generated)
        keep = _stop_prefix_len(self.pending, s.stop)
        text = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return Event(self.index, text, None, self.generated)

    def _finish(self, reason: str, piece: str) -> Event:
        text = self.pending + piece
        self.pending = ""
        cut = _first_stop(text, self.job.settings.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        self.finished = reason
        return Event(self.index, text, reason, self.generated)


class Batcher:
    """Decode the rows of every request in flight as one batch, on a background thread.

    Args:
        source: makes sessions (``Pipeline``, ``LocalModel``).
        tokenizer: decodes the generated ids into text.
        max_rows: rows decoded together at most (the batch session's ``batch_size``).
        max_len: cache positions per row of the batch session (prompt + generated, at most).
        max_waiting: rows waiting for room beyond ``max_rows``; more raise :class:`BusyError`.
        pad_token_id: the id at the left padding of a prefill (masked: its value is unseen).
        idle_close_s: seconds the batch session stays open with no rows before it is closed
            (its cache freed); 0 closes it as soon as the last row leaves.
        gather_s: when a request finds no row decoding, seconds to wait for others arriving
            with it, so that they are prefilled as one batch and decode together from their
            first step (clients often arrive together); 0 admits at once.
    """

    def __init__(
        self,
        source: SessionSource,
        tokenizer: Tokenizer,
        *,
        max_rows: int = 8,
        max_len: int = 2048,
        max_waiting: int = 8,
        pad_token_id: int = 0,
        idle_close_s: float = 1.0,
        gather_s: float = 0.005,
    ) -> None:
        if max_rows < 1 or max_len < 2 or max_waiting < 0:
            raise PartialRunError(
                f"max_rows >= 1, max_len >= 2 and max_waiting >= 0 are needed, got {max_rows}, "
                f"{max_len}, {max_waiting}"
            )
        self.source, self.tokenizer = source, tokenizer
        self.max_rows, self.max_len, self.max_waiting = max_rows, max_len, max_waiting
        self.pad_token_id, self.idle_close_s = pad_token_id, idle_close_s
        self.gather_s = gather_s
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._rows: list[_Row] = []
        self._admitted = 0  # rows taken from the queue, being prefilled (not in _rows yet)
        self._session: Session | None = None
        self._length = 0  # filled slots of the batch session's cache
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (statistics)

    # ---- public ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the decode thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="llm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread: requests still waiting or running get an error; sessions close."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`BusyError` when the rows running and waiting would
        exceed ``max_rows + max_waiting``, and PartialRunError when it can never fit."""
        if job.rows > self.max_rows:
            raise PartialRunError(
                f"a request of {job.rows} rows (prompts x n) exceeds max_rows {self.max_rows}"
            )
        longest = max(len(p) for p in job.prompts)
        if longest + job.settings.max_tokens > self.max_len:
            raise PartialRunError(
                f"prompt of {longest} tokens + max_tokens {job.settings.max_tokens} exceed the "
                f"context of {self.max_len} tokens"
            )
        with self._cond:
            if self._thread is None:
                raise PartialRunError("the batcher is not running")
            busy = self._busy_rows()
            if busy + job.rows > self.max_rows + self.max_waiting:
                raise BusyError(
                    f"{busy} rows are running or waiting (at most {self.max_rows} running and "
                    f"{self.max_waiting} waiting): try again later"
                )
            self._waiting.append(job)
            self._cond.notify_all()

    def _busy_rows(self) -> int:
        return len(self._rows) + self._admitted + sum(j.rows for j in self._waiting)

    def stats(self) -> dict[str, Any]:
        """Rows running and waiting, whether the batch session is open, steps run."""
        with self._cond:
            return {
                "running": len(self._rows) + self._admitted,
                "waiting": sum(j.rows for j in self._waiting),
                "session_open": self._session is not None,
                "length": self._length,
                "steps": self.steps,
            }

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no row runs or waits and the batch session is closed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy_rows() or self._session is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # ---- the decode thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._next_round():
                pass
        finally:
            self._shutdown()

    def _next_round(self) -> bool:
        """Admit what fits, prefill it, run one decode step; False when stopping."""
        with self._cond:
            while not (self._stopping or self._waiting or self._rows):
                if self._session is None:
                    self._cond.wait()
                elif not self._cond.wait(self.idle_close_s) and not self._waiting:
                    self._close_batch()
            if not self._rows and self.gather_s > 0:
                self._gather()
            if self._stopping:
                return False
            group = self._admit()
        if group:
            self._prefill(group)
        self._drop_cancelled()
        if self._rows:
            self._step()
        return True

    def _gather(self) -> None:
        """Wait up to ``gather_s`` for more requests to arrive, while the batch has room
        (called with the lock held, no row decoding)."""
        deadline = time.monotonic() + self.gather_s
        while not self._stopping and sum(j.rows for j in self._waiting) < self.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _admit(self) -> list[Job]:
        """Pop the waiting jobs that fit now, in order (called with the lock held)."""
        group: list[Job] = []
        rows = len(self._rows)
        length = self._length if self._rows else 0
        need = max((r.remaining for r in self._rows), default=0)
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                continue
            longest = max(len(p) for p in job.prompts)
            fits = (
                rows + job.rows <= self.max_rows
                and max(length, longest) + max(need, job.settings.max_tokens - 1) <= self.max_len
            )
            if not fits:
                break
            self._waiting.popleft()
            group.append(job)
            self._admitted += job.rows
            rows += job.rows
            length = max(length, longest)
            need = max(need, job.settings.max_tokens - 1)
        return group

    def _prefill(self, jobs: list[Job]) -> None:
        try:
            self._prefill_rows(jobs)
        finally:
            with self._cond:
                self._admitted = 0
                self._cond.notify_all()

    def _prefill_rows(self, jobs: list[Job]) -> None:
        rows, prompts = [], []
        for job in jobs:
            for p, prompt in enumerate(job.prompts):
                for j in range(job.n):
                    rows.append(_Row(job, p * job.n + j, prompt, self.tokenizer.decoder()))
                    prompts.append(prompt)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = True
        session, joining = None, False
        try:
            session = self.source.session(len(rows), width)
            logits = session(ids, mask)[:, -1].float()
            self._take(rows, logits)
            alive = [i for i, r in enumerate(rows) if not r.finished]
            if not alive:
                session.close()
                return
            if len(alive) < len(rows):
                session.keep_rows(alive)
            rows = [rows[i] for i in alive]
            if self._session is None:
                self._session = self.source.session(self.max_rows, self.max_len)
                self._length = 0
            joining = True
            self._session.join(session)
        except Exception as exc:
            log.exception("prefill of %d rows failed", len(rows))
            if session is not None:
                session.close()
            for job in jobs:
                job._emit(exc)
                job.cancel()
            if joining:  # the batch may be joined on some parts and not on others
                self._fail_batch(exc)
            return
        with self._cond:
            mine = self._length if self._rows else 0
            self._length = max(mine, max(r.extent for r in rows))
            self._rows.extend(rows)
            self._admitted = 0

    def _step(self) -> None:
        ids = torch.tensor([[r.last] for r in self._rows], dtype=torch.long)
        mask = torch.ones(ids.shape, dtype=torch.bool)
        try:
            logits = self._session(ids, mask)[:, -1].float()
            self.steps += 1
            with self._cond:
                self._length += 1
                for row in self._rows:
                    row.extent += 1
            self._take(self._rows, logits)  # a sampler may raise too (NaN logits)
        except Exception as exc:
            log.exception("decode step of %d rows failed", len(self._rows))
            self._fail_batch(exc)
            return
        self._drop_finished()

    def _take(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token from ``logits`` ``[R, V]`` and tell its job."""
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.job.cancelled.is_set():
                row.finished = "cancelled"
                continue
            row.job._emit(row.accept(row.choose(logits[i], greedy[i])))

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.finished is None and row.job.cancelled.is_set():
                row.finished = "cancelled"
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Rows that ended leave the batch (one ``keep_rows`` call)."""
        alive = [i for i, r in enumerate(self._rows) if r.finished is None]
        if len(alive) == len(self._rows):
            return
        try:
            self._session.keep_rows(alive)
        except Exception as exc:
            log.exception("keep_rows failed")
            self._fail_batch(exc)
            return
        with self._cond:
            self._rows = [self._rows[i] for i in alive]
            self._length = max((r.extent for r in self._rows), default=0)
            if not self._rows and self.idle_close_s <= 0:
                self._close_batch()
            self._cond.notify_all()

    def _fail_batch(self, exc: BaseException) -> None:
        failed = {id(r.job): r.job for r in self._rows}
        with self._cond:
            self._rows = []
            self._close_batch()
        for job in failed.values():
            job._emit(exc)
            job.cancel()

    def _close_batch(self) -> None:
        """Close the batch session (called with the lock held or from the thread)."""
        if self._session is not None:
            session, self._session = self._session, None
            self._length = 0
            try:
                session.close()
            except Exception:
                log.exception("closing the batch session failed")
            self._cond.notify_all()

    def _shutdown(self) -> None:
        error = PartialRunError("the server is shutting down")
        with self._cond:
            if self._thread is threading.current_thread():  # died of an error, not stop():
                self._thread = None  # submit refuses from now on instead of queueing forever
            jobs = {id(r.job): r.job for r in self._rows}
            jobs.update({id(j): j for j in self._waiting})
            self._rows, self._waiting = [], deque()
            self._close_batch()
        for job in jobs.values():
            job._emit(error)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text`` (None when there is none)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (held back)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
