"""Packed layer files: each streamed layer's packed weights written once, then mapped like a file.

A resident part packs its layers (llm_slice_core: the linear layers that share an input become one
matrix stored transposed), which makes a CPU decode step ~1.45x faster than computing on the
checkpoint's layout. A streamed layer cannot pack on arrival (a copy per layer per call, and the
copies break the memory bound), so the packed form is written to a file once per layer
(:meth:`ModelPart.packed_layer_state`) and streamed like the layer's own ``mid`` file; the part
adopts the mapped tensors with no copy (``set_layer_weights(i, tensors, packed=True)``).

The files live in a cache folder (:func:`default_packed_dir`:
``$XDG_CACHE_HOME/llm_microlibs/packed``, else ``~/.cache/llm_microlibs/packed``), named by what
decides their bytes::

    <sha256 of the layer's mid file, 32 hex>.<dtype>.<layout>.safetensors

where ``layout`` digests :data:`LAYOUT_VERSION`, the architecture and the packed keys and shapes
(so a model package that groups its layers differently makes new files). The same layer of two
copies of a model shares one file. A file is written under a temporary name, fsynced and
renamed; its header records the source's hash, the dtype, the layout and a digest of its tensors'
bytes. A file is used when its header, keys, shapes, dtype and size match (and, with ``verify``,
its tensors' digest); otherwise it is made again. Every tensor starts at a multiple of 64 bytes
of the file (padding tensors ``__pad.N`` fill the gaps: still a standard safetensors file), as a
resident packed matrix does in memory. Nothing removes old files: the folder is a cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_sepweight import FormatError, Manifest
from llm_sepweight.manifest import mid_name
from llm_sepweight.stfile import dtype_name, fsync_dir, map_file, read_header, temp_path

from .errors import PartialRunError

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1  # raise when what a packed file holds or how it is laid out changes
ALIGN = 64  # bytes: where every tensor of a packed file starts
PAD = "__pad."  # key prefix of the padding tensors between aligned tensors
SPACE_MARGIN = 64 * 2**20  # bytes left free on the disk beyond the files to write


def default_packed_dir() -> Path:
    """``$XDG_CACHE_HOME/llm_microlibs/packed``, else ``~/.cache/llm_microlibs/packed``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm_microlibs" / "packed"


@dataclass(frozen=True)
class PackedFile:
    """One layer's packed file: where it goes and what it must hold."""

    slot: int  # the part's local layer slot
    source: str  # the mid file's name
    source_sha256: str
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    layout: str

    @property
    def data_bytes(self) -> int:
        """Bytes of the tensors (padding aside)."""
        return sum(_numel(s) * self.dtype.itemsize for s in self.shapes.values())


def packed_layer_files(
    directory: Path,
    manifest: Manifest,
    layers: range,
    part: Any,
    packed_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = False,
) -> list[Path]:
    """The packed file of each layer of ``part`` (global layers ``layers``), made where missing
    or not matching (see the module doc), in the part's dtype.

    Before writing anything, the disk is checked for room (:class:`PartialRunError` naming
    the bytes needed and free, and the ways out). ``verify`` also re-hashes the files found.
    """
    folder = Path(packed_dir) if packed_dir is not None else default_packed_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PartialRunError(
            f"cannot make the packed layer folder {folder} ({exc.strerror}): give packed_dir= "
            "(--packed-dir) a writable folder, or pack=False (--no-pack) to stream the model's "
            "own layer files unpacked"
        ) from None
    files = [_plan(folder, manifest, layer, slot, part) for slot, layer in enumerate(layers)]
    todo = [f for f in files if not _usable(f, verify)]
    if todo:
        _check_space(folder, todo)
        start = time.perf_counter()
        for f in todo:
            _make(f, directory, part)
        log.info("made %d packed layer files in %s in %.1f s", len(todo), folder,
                 time.perf_counter() - start)  # fmt: skip
    return [f.path for f in files]


def map_packed(path: Path) -> dict[str, torch.Tensor]:
    """A packed file's tensors as views of its private memory map (padding left out)."""
    return {k: v for k, v in map_file(path).items() if not k.startswith(PAD)}


def _plan(folder: Path, manifest: Manifest, layer: int, slot: int, part: Any) -> PackedFile:
    source = mid_name(layer)
    try:
        sha = str(manifest.files[source]["sha256"])
    except KeyError:
        raise PartialRunError(f"the manifest lists no sha256 for {source}") from None
    shapes = part.packed_layer_shapes(slot)
    dtype = part.dtype
    described = [LAYOUT_VERSION, manifest.arch, sorted((k, list(s)) for k, s in shapes.items())]
    layout = hashlib.sha256(json.dumps(described).encode()).hexdigest()[:12]
    name = f"{sha[:32]}.{str(dtype).removeprefix('torch.')}.{layout}.safetensors"
    return PackedFile(slot, source, sha, folder / name, shapes, dtype, layout)


def _metadata(f: PackedFile) -> dict[str, str]:
    return {
        "format": "llm_microlibs packed layer", "layout_version": str(LAYOUT_VERSION),
        "source": f.source, "source_sha256": f.source_sha256, "dtype": dtype_name(f.dtype),
        "layout": f.layout,
    }  # fmt: skip


def _usable(f: PackedFile, verify: bool) -> bool:
    """Whether ``f.path`` holds what it must (logs why not, when it exists)."""
    if not f.path.exists():
        return False
    reason = _mismatch(f, verify)
    if reason:
        log.warning("packed layer file %s %s: making it again", f.path, reason)
    return not reason


def _mismatch(f: PackedFile, verify: bool) -> str:
    try:
        header = read_header(f.path)
    except (FormatError, OSError) as exc:
        return f"cannot be read ({exc})"
    meta = header.metadata
    if any(meta.get(k) != v for k, v in _metadata(f).items()):
        return "was made from other weights or in another layout"
    infos = {k: i for k, i in header.tensors.items() if not k.startswith(PAD)}
    if {k: i.shape for k, i in infos.items()} != f.shapes:
        return "holds other tensors"
    if any(i.dtype != f.dtype for i in infos.values()):
        return "holds another dtype"
    end = max((i.stop for i in header.tensors.values()), default=0)
    if header.file_size != header.data_offset + end:
        return f"has {header.file_size} bytes, its header says {header.data_offset + end}"
    if verify and _digest(map_packed(f.path)) != meta.get("tensors_sha256"):
        return "does not match its digest (corrupt)"
    return ""


def _check_space(folder: Path, todo: list[PackedFile]) -> None:
    need = sum(f.data_bytes + 2 * ALIGN * (len(f.shapes) + 64) for f in todo)
    free = shutil.disk_usage(folder).free
    if need + SPACE_MARGIN > free:
        raise PartialRunError(
            f"packed layer files for {len(todo)} layers need {need / 1e9:.2f} GB in {folder}, "
            f"which has {free / 1e9:.2f} GB free: give packed_dir= (--packed-dir) a folder on a "
            "disk with room, or pack=False (--no-pack) to stream the model's own layer files "
            "unpacked (slower on a CPU)"
        )


def _make(f: PackedFile, directory: Path, part: Any) -> None:
    """Write ``f`` from its mid file: mapped, converted if the dtype differs, packed (one copy
    of the layer, freed once written)."""
    source = map_file(directory / f.source)
    source = {k: v.to(f.dtype) if v.is_floating_point() else v for k, v in source.items()}
    state = part.packed_layer_state(f.slot, source)
    del source
    _remove_stale_temporaries(f.path)
    _write(f.path, state, {**_metadata(f), "tensors_sha256": _digest(state)})


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors' bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(_bytes(tensors[key]))
    return digest.hexdigest()


def _bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes (no copy; valid while ``t`` lives)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _write(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file whose tensors start at multiples of :data:`ALIGN` bytes
    (temporary name, fsync, rename)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    pieces: list[torch.Tensor | int] = []  # tensors, and gap sizes (zero bytes)
    offset = 0
    for key in order:
        gap = -offset % ALIGN
        if gap:
            entries[f"{PAD}{len(pieces)}"] = {"dtype": "U8", "shape": [gap],
                                              "data_offsets": [offset, offset + gap]}  # fmt: skip
            pieces.append(gap)
            offset += gap
        t = tensors[key].contiguous()
        nbytes = t.numel() * t.element_size()
        entries[key] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        pieces.append(t)
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)  # the data area starts aligned too
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(header)) + header)
            for piece in pieces:
                out.write(bytes(piece) if isinstance(piece, int) else _bytes(piece))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by processes that died while writing it."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
