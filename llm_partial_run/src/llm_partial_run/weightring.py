"""Layer weights on their way from disk to the device: memory maps, a loader thread, a CUDA ring.

A :class:`LayerStream` hands out the weights of a part's layers in order ``0, 1, ..., n-1, 0, ...``
(one pass per forward call) and keeps at most ``slots`` layers in the process's memory at once:
the one computing plus those loaded ahead. Its loader thread works one pass ahead of the compute,
so layer 0 of the next call loads while the head of this one runs.

Stages, each timed in :class:`StreamStats`:

* ``readahead`` -- disk -> page cache, for the layers after the one just loaded, while it computes
  (:meth:`LayerFile.warm`: through the layer's huge-page map a 2 MiB chunk at a time, each
  released at once, so the page cache gets 2 MiB folios; without huge pages
  ``posix_fadvise(WILLNEED)``). Page cache is the kernel's, not this process's, memory.
* ``map`` -- page cache -> this process (``madvise(MADV_POPULATE_READ)`` on the layer's private
  memory map: the page tables are filled at once instead of a fault at a time during compute).
* ``convert`` -- a dtype change on the CPU (a copy), only when the part's dtype is not the file's.
* ``host_copy`` / ``to_device`` (CUDA) -- the map into a reused pinned buffer, then a
  non-blocking copy into a reused device slot on a side stream, ordered by events.

After a layer has run, its pages leave the process (``madvise(MADV_DONTNEED)``: the map stays,
the next touch reads the page cache or the disk again), so the resident set holds ``slots``
layers, not the part.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import PartialRunError

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = 22  # Linux >= 5.14; not in Python's mmap module before 3.13
_MADV_HUGEPAGE = 14
_HUGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB pages)
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None

STAGES = ("readahead", "map", "convert", "host_copy", "to_device")


@dataclass
class StreamStats:
    """What streaming cost and how much of it the compute hid.

    ``seconds[stage]`` / ``bytes[stage]`` per stage (see :data:`STAGES`); ``wait_seconds`` is
    the time the compute stood still waiting for a layer (the load time *not* hidden);
    ``compute_seconds`` the time spent inside the layers (with their weights' setting and
    dropping); ``calls`` forward calls, ``layers`` layers run.
    """

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    calls: int = 0
    layers: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, stage: str, seconds: float, nbytes: int) -> None:
        """Count ``nbytes`` moved by ``stage`` in ``seconds`` (thread-safe)."""
        with self._lock:
            self.seconds[stage] += seconds
            self.bytes[stage] += nbytes

    @property
    def load_seconds(self) -> float:
        """Time spent loading (every stage), in the loader thread or in the caller's."""
        return sum(self.seconds.values())

    @property
    def hidden_fraction(self) -> float:
        """Share of the load time that ran while the compute was busy (0 to 1)."""
        load = self.load_seconds
        return 0.0 if load <= 0 else max(0.0, 1.0 - self.wait_seconds / load)

    def gb_per_s(self, stage: str) -> float:
        """Achieved rate of one stage in GB/s (10^9 bytes per second; 0 when it never ran)."""
        seconds = self.seconds[stage]
        return 0.0 if seconds <= 0 else self.bytes[stage] / seconds / 1e9

    def reset(self) -> None:
        """Zero every counter (e.g. after a warm-up)."""
        with self._lock:
            self.seconds = dict.fromkeys(STAGES, 0.0)
            self.bytes = dict.fromkeys(STAGES, 0)
            self.wait_seconds = self.compute_seconds = 0.0
            self.calls = self.layers = 0

    def report(self) -> str:
        """A few lines for a person: per-stage GB/s and how much of the load was hidden."""
        lines = [
            f"streamed {self.layers} layers in {self.calls} calls: compute "
            f"{self.compute_seconds:.3f} s, load {self.load_seconds:.3f} s, waited "
            f"{self.wait_seconds:.3f} s ({100 * self.hidden_fraction:.0f}% of the load hidden)"
        ]
        for stage in STAGES:
            if self.bytes[stage] or self.seconds[stage]:
                lines.append(
                    f"  {stage:<10} {self.bytes[stage] / 1e9:8.3f} GB in "
                    f"{self.seconds[stage]:7.3f} s = {self.gb_per_s(stage):7.2f} GB/s"
                )
        return "\n".join(lines)


class LayerFile:
    """One layer's tensors as views of its private memory map, and the map's pages managed.

    ``tensors`` are views of the map (from :func:`llm_sepweight.load`); ``populate`` brings the
    pages in, ``release`` sends them out of this process again (the views stay valid: a later
    touch reads the file again), ``readahead`` / ``evict`` ask the kernel to read the file into,
    or drop it from, the page cache.
    """

    def __init__(
        self, path: Path, tensors: Mapping[str, torch.Tensor], *, huge_pages: bool = True
    ) -> None:
        self.path = path
        self.tensors = dict(tensors)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())
        self._range = _mapped_range(path, self.tensors.values())
        self.layout, self.span, self.flat = _layout(self.tensors)
        self.huge = False
        if huge_pages and self._range is not None:
            # Pages faulted in through this map are read into 2 MiB page-cache folios and mapped
            # whole (one page-table entry per 2 MiB): bringing a cached layer back in then costs
            # ~0.06 ms instead of ~0.85 ms for 14 MB of 4 KiB pages (measured on the dev VM).
            self.huge = _madvise(*self._range, _MADV_HUGEPAGE)

    def readahead(self) -> None:
        """Start reading the file into the page cache (returns at once)."""
        _fadvise(self.path, os.POSIX_FADV_WILLNEED if hasattr(os, "posix_fadvise") else 0)

    def warm(self, stop: threading.Event | None = None) -> None:
        """Read the layer into the page cache without keeping it in this process.

        With huge pages, through the layer's own map a 2 MiB chunk at a time, each released
        right after: the page cache gets the 2 MiB folios a later :meth:`populate` maps at
        once (``posix_fadvise(WILLNEED)`` would read 4 KiB pages, ~2x slower to map for every
        process that maps the file later). Returns when read (or ``stop`` is set). Without
        huge pages, :meth:`readahead` (asynchronous).
        """
        if not self.huge:
            self.readahead()
            return
        address, length = self._range
        start = address - address % _HUGE
        for chunk in range(start, address + length, _HUGE):
            if stop is not None and stop.is_set():
                return
            low, high = max(chunk, address), min(chunk + _HUGE, address + length)
            if not _madvise(low, high - low, _MADV_POPULATE_READ):
                self.readahead()  # no populate advice here: the kernel's asynchronous read
                return
            _madvise(low, high - low, mmap.MADV_DONTNEED)

    def populate(self) -> None:
        """Map every page of the layer into this process now (reading the disk if need be)."""
        if self._range is None or not _madvise(*self._range, _MADV_POPULATE_READ):
            for t in self.tensors.values():  # no populate advice: one read per page
                if t.numel():
                    t.view(-1)[:: max(1, _PAGE // t.element_size())].sum()

    def release(self) -> None:
        """Unmap the layer's pages from this process (its resident set shrinks by them)."""
        if self._range is not None:
            _madvise(*self._range, mmap.MADV_DONTNEED)

    def evict(self) -> None:
        """Drop the file from the page cache (pages mapped elsewhere stay); for benchmarks."""
        self.release()
        _fadvise(self.path, getattr(os, "POSIX_FADV_DONTNEED", 0))


def _layout(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, int], int, torch.Tensor | None]:
    """Where each tensor goes in a flat byte buffer, the buffer's size, and the layer's bytes as
    one uint8 view of its map when they lie there back to back (else None: copy one by one).

    Back to back (every file sepweight writes), the offsets are the file's own; otherwise each
    tensor starts at the next multiple of 64 bytes.
    """
    items = sorted(tensors.items(), key=lambda kv: kv[1].data_ptr())
    sizes = {k: t.numel() * t.element_size() for k, t in items}
    if items and all(t.is_contiguous() and sizes[k] for k, t in items):
        first = items[0][1]
        base, storage = first.data_ptr(), first.untyped_storage()
        offset, back_to_back = 0, True
        for key, t in items:
            back_to_back &= t.data_ptr() - base == offset
            back_to_back &= t.untyped_storage().data_ptr() == storage.data_ptr()
            offset += sizes[key]
        if back_to_back:
            whole = torch.empty(0, dtype=torch.uint8).set_(storage)
            lo = base - storage.data_ptr()
            flat = whole[lo : lo + offset]
            return {k: t.data_ptr() - base for k, t in items}, offset, flat
    layout, offset = {}, 0
    for key, _ in items:
        layout[key] = offset
        offset += sizes[key] + (-sizes[key] % 64)
    return layout, offset, None


def _mapped_range(path: Path, tensors) -> tuple[int, int] | None:
    """(address, length) of the file's memory map, found as the storage the views share."""
    size = os.stat(path).st_size
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes() == size and t.device.type == "cpu":
            return storage.data_ptr(), size
    return None


def _madvise(address: int, length: int, advice: int) -> bool:
    if _libc is None:
        return False
    start = address - address % _PAGE
    stop = address + length
    stop += -stop % _PAGE
    ok = _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), advice) == 0
    if not ok:
        log.debug("madvise(%d) failed: %s", advice, os.strerror(ctypes.get_errno()))
    return ok


def _fadvise(path: Path, advice: int) -> None:
    if not hasattr(os, "posix_fadvise") or not advice:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, advice)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Where a layer goes: staying on the CPU, or into a CUDA device slot.


@dataclass
class Loaded:
    """One layer on its way: its index, its tensors, and what the device path needs back."""

    index: int
    tensors: dict[str, torch.Tensor]
    slot: int = -1
    ready: torch.cuda.Event | None = None


class HostPath:
    """disk -> this process's memory: populate the map; convert only if the dtype differs."""

    def __init__(self, files: Sequence[LayerFile], dtype: torch.dtype, stats: StreamStats):
        self.files, self.dtype, self.stats = files, dtype, stats
        self.zero_copy = not any(_converts(t, dtype) for f in files for t in f.tensors.values())

    def load(self, index: int) -> Loaded:
        """Bring layer ``index`` in (runs in the loader thread)."""
        f = self.files[index]
        start = time.perf_counter()
        f.populate()
        self.stats.add("map", time.perf_counter() - start, f.nbytes)
        tensors = f.tensors
        if not self.zero_copy:
            start = time.perf_counter()
            tensors = {k: _cast(t, self.dtype) for k, t in tensors.items()}
            f.release()  # the copies are what the layer uses
            self.stats.add("convert", time.perf_counter() - start, f.nbytes)
        return Loaded(index, tensors)

    def ready(self, loaded: Loaded) -> dict[str, torch.Tensor]:
        """The tensors to give the part (caller's thread)."""
        return loaded.tensors

    def release(self, loaded: Loaded) -> None:
        """The layer has run and its weights are dropped: its pages leave the process."""
        self.files[loaded.index].release()

    def close(self) -> None:
        """Nothing to free beyond the maps (they go with the files)."""


def _converts(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.is_floating_point() and t.dtype != dtype


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class CudaPath:
    """disk -> pinned host buffer (reused) -> device slot (reused), on a side stream.

    ``slots`` device buffers, each the size of the largest layer, hold the layers the compute
    may use; two pinned host buffers take turns. The loader thread copies a layer from its map
    into a pinned buffer in chunks, queueing each chunk's host-to-device copy on the side stream
    as soon as it is in the buffer; the side stream first waits on the event the compute
    recorded when the slot's previous layer was dropped. The compute stream waits on the
    layer's ready event (no host synchronisation on the compute side). A pinned buffer is reused
    only once its previous copy is done (the loader thread waits on that event).
    """

    CHUNK = 8 * 1024 * 1024

    def __init__(
        self,
        files: Sequence[LayerFile],
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        stats: StreamStats,
    ) -> None:
        self.files, self.device, self.dtype, self.stats = files, device, dtype, stats
        size = max(f.span for f in files)
        size += -size % 512
        self.pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.pinned_free: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(slots)]
        self.slot_free: list[torch.cuda.Event | None] = [None] * slots
        self.free_slots: queue.Queue[int] = queue.Queue()
        for s in range(slots):
            self.free_slots.put(s)
        self.side = torch.cuda.Stream(device)
        self._timings: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []

    def load(self, index: int) -> Loaded:
        """Copy layer ``index`` into a free device slot (loader thread; waits for a slot)."""
        f = self.files[index]
        start = time.perf_counter()
        f.populate()
        self.stats.add("map", time.perf_counter() - start, f.nbytes)
        slot = self.free_slots.get()
        pin, done = self._pinned_buffer()
        begin_ev, ready = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        host = time.perf_counter()
        if f.flat is None:  # tensors scattered in the file: gather them, then one copy
            for key, t in f.tensors.items():
                n = t.numel() * t.element_size()
                pin[f.layout[key] : f.layout[key] + n].copy_(
                    t.contiguous().view(-1).view(torch.uint8)
                )
        with torch.cuda.stream(self.side):
            if self.slot_free[slot] is not None:
                self.side.wait_event(self.slot_free[slot])
            begin_ev.record(self.side)
            for lo in range(0, f.span, self.CHUNK):  # each chunk goes up as soon as it is pinned
                hi = min(lo + self.CHUNK, f.span)
                if f.flat is not None:
                    pin[lo:hi].copy_(f.flat[lo:hi])
                self.slots[slot][lo:hi].copy_(pin[lo:hi], non_blocking=True)
            ready.record(self.side)
        self.pinned_free[done] = ready
        self._timings.append((begin_ev, ready, f.nbytes))
        self.stats.add("host_copy", time.perf_counter() - host, f.nbytes)
        f.release()
        return Loaded(index, _views(self.slots[slot], f), slot, ready)

    def _pinned_buffer(self) -> tuple[torch.Tensor, int]:
        turn = self.turn
        self.turn = 1 - turn
        if self.pinned_free[turn] is not None:
            self.pinned_free[turn].synchronize()  # its previous copy to the device is done
        return self.pinned[turn], turn

    def ready(self, loaded: Loaded) -> dict[str, torch.Tensor]:
        """Make the compute stream wait for the layer's copy; convert the dtype if needed."""
        torch.cuda.current_stream(self.device).wait_event(loaded.ready)
        self._collect_timings()
        return {k: _cast(t, self.dtype) for k, t in loaded.tensors.items()}

    def release(self, loaded: Loaded) -> None:
        """The compute stream is done with the slot once it reaches this point."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.slot_free[loaded.slot] = event
        self.free_slots.put(loaded.slot)

    def close(self) -> None:
        """Wait for the side stream, so no copy still writes into a buffer about to be freed."""
        self.side.synchronize()
        self._collect_timings()

    def _collect_timings(self) -> None:
        while self._timings and self._timings[0][1].query():
            begin, end, nbytes = self._timings.pop(0)
            self.stats.add("to_device", begin.elapsed_time(end) / 1000, nbytes)


def _views(buffer: torch.Tensor, f: LayerFile) -> dict[str, torch.Tensor]:
    """The layer's tensors as views of ``buffer``, which holds its bytes laid out as
    ``f.layout`` says."""
    out = {}
    for key, t in f.tensors.items():
        lo = f.layout[key]
        raw = buffer[lo : lo + t.numel() * t.element_size()]
        out[key] = raw.view(t.dtype).view(t.shape)
    return out


# ---------------------------------------------------------------------------------------------
# The order of loads: a thread one step ahead of the compute, bounded by the slots.


class LayerStream:
    """Layers of a part handed out in order, at most ``slots`` of them held at once.

    ``get(i)`` returns layer ``i``'s tensors (waiting for the loader if it is behind);
    ``done(i)`` after the layer ran gives its slot back. With ``prefetch`` a loader thread loads
    ahead; without it each ``get`` loads in the caller's thread. With ``slots >= len(files)``
    every layer is loaded once and kept. A ``get`` out of the expected order (a forward call that
    failed half-way) restarts the loader at the asked layer.
    """

    def __init__(
        self,
        path: HostPath | CudaPath,
        count: int,
        slots: int,
        *,
        prefetch: bool,
        stats: StreamStats,
        readahead: int = 2,
    ) -> None:
        self.path, self.count, self.slots, self.stats = path, count, slots, stats
        self.keep = slots >= count
        self.prefetch = prefetch and not self.keep
        self.readahead = readahead
        self._kept: dict[int, Loaded] = {}
        self._held: dict[int, Loaded] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if self.prefetch:
            self._start(0)

    # -- caller's side --------------------------------------------------------------------

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """Layer ``index``'s tensors, ready for the part's ``set_layer_weights``."""
        if self.keep:
            if index not in self._kept:
                loaded = self._load(index)
                loaded.tensors = self.path.ready(loaded)
                self._kept[index] = loaded
            return self._kept[index].tensors
        if not self.prefetch:  # loaded here, so none of it is hidden
            start = time.perf_counter()
            loaded = self._load(index)
            self.stats.wait_seconds += time.perf_counter() - start
        else:
            loaded = self._next_loaded(index)
        self._held[index] = loaded
        return self.path.ready(loaded)

    def done(self, index: int) -> None:
        """Layer ``index`` ran and the part dropped its weights: release them and the slot."""
        if self.keep:
            return
        loaded = self._held.pop(index)
        self.path.release(loaded)
        if self.prefetch:
            self._slots.release()

    def close(self) -> None:
        """Stop the loader thread and release whatever it had loaded."""
        self._stop_thread()
        for loaded in [*self._held.values(), *self._kept.values()]:
            self.path.release(loaded)
        self._held.clear()
        self._kept.clear()
        self.path.close()

    def _next_loaded(self, index: int) -> Loaded:
        start = time.perf_counter()
        dead = self._thread is None or not self._thread.is_alive()
        if dead and self._ready.empty():  # a load failed (and was raised): start again
            self._stop_thread()
            self._start(index)
        loaded = self._take()
        if loaded.index != index:  # the previous call stopped half-way: start over at index
            log.debug(
                "layer stream out of order (got %d, want %d): restarting", loaded.index, index
            )
            self.path.release(loaded)
            self._slots.release()
            self._stop_thread()
            self._start(index)
            loaded = self._take()
        self.stats.wait_seconds += time.perf_counter() - start
        return loaded

    def _take(self) -> Loaded:
        while True:
            try:
                loaded = self._ready.get(timeout=0.5)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise PartialRunError(f"the layer loader stopped: {self._error!r}") from None
                continue
            if isinstance(loaded, BaseException):
                raise PartialRunError(f"loading a layer failed: {loaded}") from loaded
            return loaded

    # -- loader thread ----------------------------------------------------------------------

    def _start(self, first: int) -> None:
        self._slots = threading.Semaphore(self.slots)
        self._ready: queue.Queue[Loaded | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(first,), name="layer-loader", daemon=True
        )
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        while not self._ready.empty():
            item = self._ready.get()
            if isinstance(item, Loaded):
                self.path.release(item)

    def _run(self, index: int) -> None:
        ahead = set()
        try:
            while not self._stop.is_set():
                if not self._slots.acquire(timeout=0.1):
                    continue
                if self._stop.is_set():
                    return
                self._ready.put(self._load(index))
                self._read_ahead(index, ahead)  # while layer ``index`` computes
                index = (index + 1) % self.count
        except BaseException as exc:  # handed to the caller, which raises it
            self._error = exc
            self._ready.put(exc)

    def _read_ahead(self, index: int, ahead: set[int]) -> None:
        """Read the next few layers into the page cache (once per pass each; never one that
        may still be held from the last pass)."""
        ahead.discard(index)
        start = time.perf_counter()
        nbytes = 0
        for step in range(1, min(self.readahead, self.count - self.slots) + 1):
            nxt = (index + step) % self.count
            if nxt not in ahead:
                self.path.files[nxt].warm(self._stop)
                ahead.add(nxt)
                nbytes += self.path.files[nxt].nbytes
        if nbytes:
            self.stats.add("readahead", time.perf_counter() - start, nbytes)

    def _load(self, index: int) -> Loaded:
        return self.path.load(index)
