"""A part whose layers are streamed through at most K slots: a model larger than the device runs.

``load_streamed(directory, spec, resident_layers=K)`` builds the part's begin and end with their
weights and every layer weightless (the slice contract's ``layers=False``), maps the layers'
``mid.NNNNN`` files, and returns a :class:`StreamedPart`: the same surface as a part (``spec``,
``config``, ``dtype``, ``device``, ``new_cache``, ``cache_bytes``, ``part(x, mask, cache)``), so a
node, a local model or the sampler use it in place of a resident one. A call runs::

    h, step = part.prepare(x, mask, cache)
    for i in range(n):                     # the loader thread is already loading i + 1 ...
        part.set_layer_weights(i, stream.get(i))
        h = part.layers[i](h, step, cache.layers[i])
        part.drop_layer_weights(i); stream.done(i)
    out = part.complete(h, step, cache)

so the whole batch goes through a layer before its weights leave (layer-major batching: one
weight pass per step, whatever the batch size). :mod:`llm_partial_run.weightring` moves the
bytes; ``StreamedPart.stats`` says where the time went.

On a CPU the layers are computed directly on memory-mapped files (no copy: the loader thread
maps the next layer's pages in while one computes, and a layer's pages leave the process after
it ran). By default those are packed layer files (:mod:`llm_partial_run.packed_layers`: each
layer's packed weights, written once into a cache folder), so a streamed layer computes exactly
as a resident packed one; ``pack=False`` maps the model's own ``mid`` files instead (the
checkpoint's layout, ~1.45x slower on a CPU, nothing written). On CUDA the layers go through
pinned host buffers into ``K`` reused device slots on a side stream, in the files' layout (with
``pack=True`` the part packs each layer as it arrives: a copy per layer per call).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from llm_sepweight import PartSpec, find_architecture, load, read_manifest
from llm_sepweight import verify as verify_files
from llm_sepweight.manifest import mid_name
from llm_sepweight.stfile import read_header

from .errors import PartialRunError
from .packed_layers import map_packed, packed_layer_files
from .weightring import CudaPath, HostPath, LayerFile, LayerStream, StreamStats


class StreamedPart:
    """A part of a model whose layers' weights are streamed, at most ``resident_layers`` at once.

    Use it as the part itself: ``out = streamed(x, mask, cache)`` with a cache from
    ``streamed.new_cache(batch_size, max_len)``. ``stats`` (a :class:`StreamStats`) counts the
    bytes and seconds of each stage and how much of the loading the compute hid. Close it (or
    use it as a context manager) to stop its loader thread. ``packed_files`` says whether the
    layers come from packed layer files (``files[i].path`` names them) rather than the model's
    own ``mid`` files.
    """

    def __init__(
        self,
        part: torch.nn.Module,
        files: list[LayerFile],
        *,
        resident_layers: int,
        device: torch.device,
        prefetch: bool,
        pack: bool = False,
        packed_files: bool = False,
        readahead: int = 0,
    ) -> None:
        self.part = part
        self.files = files
        self.packed_files = packed_files
        self.resident_layers = resident_layers
        self._device = device
        self.stats = StreamStats()
        dtype = part.dtype
        if device.type == "cuda":
            path: HostPath | CudaPath = CudaPath(
                files, min(resident_layers, max(1, len(files))), device, dtype, self.stats
            )
        else:
            path = HostPath(files, dtype, self.stats)
        self._stream = LayerStream(
            path,
            len(files),
            resident_layers,
            prefetch=prefetch and len(files) > 0,
            stats=self.stats,
            readahead=readahead,
        )
        self._lock = threading.Lock()
        self._closed = False
        # On the CPU, unpacked and in the files' dtype, a layer's weights are views of its map:
        # they are given to the part once and stay; only their pages come and go (the resident
        # set holds K layers, the rest are address space). Otherwise (K >= layers aside) each
        # call sets a layer's weights before it runs and drops them after.
        # Packed files hold the packed state: adopted as it is (``packed=True``), no copy.
        self._assigned = self._stream.keep or (
            isinstance(path, HostPath) and path.zero_copy and (packed_files or not pack)
        )
        if self._assigned:
            for i, f in enumerate(files):
                tensors = self._stream.get(i) if self._stream.keep else f.tensors
                part.set_layer_weights(i, tensors, packed=packed_files)

    @property
    def spec(self) -> PartSpec:
        """The resolved part spec (``part.spec``)."""
        return self.part.spec

    @property
    def config(self) -> Any:
        """The model's config, as the part has it."""
        return self.part.config

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the part's weights and hidden states."""
        return self.part.dtype

    @property
    def device(self) -> torch.device:
        """The device the layers run on."""
        return self._device

    @property
    def prefetch(self) -> bool:
        """Whether a loader thread loads the next layers while one computes."""
        return self._stream.prefetch

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """A KV cache for ``batch_size`` rows of ``max_len`` positions (``part.new_cache``)."""
        return self.part.new_cache(batch_size, max_len)

    def cache_bytes(self, batch_size: int, max_len: int) -> int:
        """Bytes ``new_cache`` would allocate (``part.cache_bytes``)."""
        return self.part.cache_bytes(batch_size, max_len)

    def layer_bytes(self) -> list[int]:
        """The weight bytes of each of the part's layers, in order."""
        return [f.nbytes for f in self.files]

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None
    ) -> torch.Tensor:
        """Run the part on ``x`` exactly as the resident part would (see the module doc)."""
        if self._closed:
            raise PartialRunError("this StreamedPart is closed")
        with self._lock:
            part, stream, stats = self.part, self._stream, self.stats
            h, step = part.prepare(x, mask, cache)
            for i in range(len(part.layers)):
                tensors = stream.get(i)
                start = time.perf_counter()
                try:
                    if not self._assigned:
                        part.set_layer_weights(i, tensors, packed=self.packed_files)
                    del tensors
                    h = part.layers[i](h, step, None if cache is None else cache.layers[i])
                finally:
                    if not self._assigned:
                        part.drop_layer_weights(i)
                    stream.done(i)
                stats.compute_seconds += time.perf_counter() - start
            stats.calls += 1
            stats.layers += len(part.layers)
            return part.complete(h, step, cache)

    forward = __call__

    def evict(self) -> None:
        """Drop the layers' files from the page cache (benchmarks: the next pass reads the disk)."""
        for f in self.files:
            f.evict()

    def close(self) -> None:
        """Stop the loader thread and release the layers it holds; further calls raise."""
        if not self._closed:
            self._closed = True
            with self._lock:
                self._stream.close()

    def __enter__(self) -> StreamedPart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"StreamedPart({str(self.spec)!r}, resident_layers={self.resident_layers}, "
            f"device={self.device}, prefetch={self.prefetch})"
        )


def add_packed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--packed-dir DIR`` and ``--no-pack``: the options of every command that takes
    ``--resident-layers`` (their values go to ``packed_dir=`` and ``pack=``)."""
    parser.add_argument("--packed-dir", type=Path, metavar="DIR",
                        help="with --resident-layers: where the layers' packed files are kept "
                             "(made once; default ~/.cache/llm_microlibs/packed)")  # fmt: skip
    parser.add_argument("--no-pack", action="store_true",
                        help="do not pack the weights: streamed layers come from the model's own "
                             "files (nothing written), resident ones compute on them; slower on "
                             "a CPU")  # fmt: skip


def load_streamed(
    directory: str | os.PathLike[str],
    spec: str | PartSpec = "f",
    *,
    resident_layers: int,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    prefetch: bool = True,
    pack: bool | None = None,
    packed_dir: str | os.PathLike[str] | None = None,
    verify: bool = False,
    readahead: int | None = None,
    huge_pages: bool = True,
) -> StreamedPart:
    """Load part ``spec`` of the sepweight model in ``directory`` with its layers streamed.

    ``resident_layers`` (K >= 1) bounds how many layers' weights are in memory (on ``device``)
    at once, counting the one computing and those loaded ahead; with K >= the part's layer
    count every layer is loaded once and kept. ``prefetch`` loads the next layers on a
    background thread while one computes (with K = 1 only the page-cache read-ahead can run
    ahead).

    ``pack`` (CPU): None or True streams packed layer files (the default: a streamed layer then
    computes exactly as a resident packed one, ~1.45x faster than the checkpoint's layout). They
    are made once per layer, weights and dtype in ``packed_dir`` (default
    :func:`~llm_partial_run.packed_layers.default_packed_dir`,
    ``~/.cache/llm_microlibs/packed``), reused while they match and made again when they do not
    (see :mod:`~llm_partial_run.packed_layers`); when the disk lacks the room a
    :class:`PartialRunError` says so before anything is written. ``pack=False`` streams the
    model's own ``mid`` files (nothing written). On CUDA, None and False keep the files' layout
    in the device slots and True packs each layer as it arrives (a copy per layer per call).
    ``verify`` re-hashes the part's files first (and the packed files found).

    ``readahead``: how many layers past the one just loaded are read into the page cache while
    it computes (through their huge-page maps, a 2 MiB chunk at a time, or ``posix_fadvise``
    without huge pages); None means 1 with K = 1 (nothing else can run ahead there) and 0
    otherwise (the loader thread already loads the next layer itself).

    ``huge_pages`` (Linux): the layers' maps are advised ``MADV_HUGEPAGE``, so what they fault
    in lands in the page cache as 2 MiB folios, mapped with one entry per 2 MiB: bringing a
    cached 14 MB SmolLM2 layer back into the process then costs ~0.06 ms instead of ~0.85 ms.
    To get there, the layers' files are dropped from the page cache once here (pages another
    process maps stay), so the first call reads them from disk through those maps.
    """
    if not isinstance(resident_layers, int) or resident_layers < 1:
        raise PartialRunError(f"resident_layers must be an integer >= 1, got {resident_layers!r}")
    if readahead is None:
        readahead = 1 if resident_layers == 1 else 0
    if readahead < 0:
        raise PartialRunError(f"readahead must be >= 0, got {readahead}")
    directory = Path(directory)
    manifest = read_manifest(directory)
    resolved = PartSpec.parse(spec).resolve(manifest.num_layers)
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    arch = find_architecture(name=manifest.arch)
    if dtype is None and len(resolved.layers):
        # the layers' stored dtype: a part without begin and end has no weights to say it
        dtype = _stored_dtype(directory / mid_name(resolved.layers.start))
    packed_files = device.type != "cuda" and pack is not False
    if packed_files:
        # The mid files are not mapped here: read only to make a missing packed file (a map
        # would fault in a page-cache folio of each, up to 2 MiB, at the load's peak).
        if verify:
            verify_files(directory, part=resolved)
        part = arch.load_part(directory, resolved, device=device, dtype=dtype, pack=True,
                              layers=False)  # fmt: skip
        paths = packed_layer_files(directory, manifest, resolved.layers, part, packed_dir,
                                   verify=verify)  # fmt: skip
        files = [LayerFile(p, map_packed(p), huge_pages=huge_pages) for p in paths]
    else:
        weights = load(directory, resolved, verify=verify)  # maps the part's files
        part = arch.load_part(directory, resolved, device=device, dtype=dtype, pack=bool(pack),
                              layers=False)  # fmt: skip
        files = [
            LayerFile(directory / mid_name(i), weights.layers[i], huge_pages=huge_pages)
            for i in resolved.layers
        ]
        del weights
    for f in files:
        if f.huge:  # only then does the first read through the map make 2 MiB folios
            f.evict()
    return StreamedPart(
        part,
        files,
        resident_layers=resident_layers,
        device=device,
        prefetch=prefetch,
        pack=bool(pack),
        packed_files=packed_files,
        readahead=readahead,
    )


def _stored_dtype(path: Path) -> torch.dtype | None:
    """The floating-point dtype holding most of a safetensors file's bytes (None if none): a
    bfloat16 layer may keep float32 norms, which the file lists first (largest items first)."""
    sizes: dict[torch.dtype, int] = {}
    for info in read_header(path).tensors.values():
        if info.dtype.is_floating_point:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.stop - info.start
    return max(sizes, key=sizes.__getitem__) if sizes else None
