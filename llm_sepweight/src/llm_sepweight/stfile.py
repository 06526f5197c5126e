"""Reading and writing safetensors files: streamed, hashed, atomic writes; memory-mapped reads.

Why our own code and not ``safetensors.torch``: a write streams each tensor's bytes straight from
its (possibly memory-mapped) storage into the file while hashing them, so no second copy of a
layer is built in RAM; a read maps the file privately and returns tensors that are views of the
mapping, so nothing is read from disk until it is touched. The files are standard safetensors:
``safetensors.safe_open`` reads what we write, and we read what it writes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import FormatError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file (offsets relative to the data area)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class Header:
    """The parsed header of a safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # byte offset of the data area in the file
    file_size: int


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored in safetensors") from None


def _write_tensor(f: BinaryIO, digest: Any, tensor: torch.Tensor) -> None:
    """Write and hash a tensor's bytes, without a copy when it is contiguous on the CPU.

    The bytes are reached through ctypes (no numpy needed); ``flat`` owns the memory and lives
    until this function returns, after the last read of the view.
    """
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return
    data = memoryview((ctypes.c_char * nbytes).from_address(flat.data_ptr())).cast("B")
    for i in range(0, nbytes, _CHUNK):
        piece = data[i : i + _CHUNK]
        f.write(piece)
        digest.update(piece)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_file(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[str, int]:
    """Write ``tensors`` to ``path`` atomically; return (sha256 hex digest, size in bytes).

    Tensors are laid out largest item size first, so every tensor starts at an offset aligned to
    its own item size and can be mapped back as a view without a copy.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        entries[key] = {
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    digest = hashlib.sha256()
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        for chunk in (struct.pack("<Q", len(header)), header):
            f.write(chunk)
            digest.update(chunk)
        for key in order:
            _write_tensor(f, digest, tensors[key])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return digest.hexdigest(), 8 + len(header) + offset


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of a safetensors file without reading its data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = _header_length(path, prefix, file_size)
            return _parse_header(path, f.read(n), file_size)
    except FileNotFoundError:
        raise FormatError(f"missing file: {path}") from None


def _header_length(path: Path, prefix: bytes, file_size: int) -> int:
    if len(prefix) < 8:
        raise FormatError(f"{path}: truncated safetensors file ({file_size} bytes)")
    (n,) = struct.unpack("<Q", prefix)
    if n > _MAX_HEADER or 8 + n > file_size:
        raise FormatError(f"{path}: header length {n} does not fit the file (truncated?)")
    return n


def _parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    metadata = entries.pop("__metadata__", None) or {}
    data_size = file_size - 8 - len(raw)
    tensors = {key: _parse_entry(path, key, value, data_size) for key, value in entries.items()}
    return Header(path, tensors, metadata, 8 + len(raw), file_size)


def _parse_entry(path: Path, key: str, value: object, data_size: int) -> TensorInfo:
    try:
        dtype = _DTYPES[value["dtype"]]  # type: ignore[index]
        shape = tuple(int(s) for s in value["shape"])  # type: ignore[index]
        start, stop = (int(o) for o in value["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: bad header entry for tensor {key!r}: {value!r}") from None
    numel = 1
    for s in shape:
        numel *= s
    if min(shape, default=0) < 0 or stop - start != numel * dtype.itemsize or start < 0:
        raise FormatError(f"{path}: tensor {key!r} offsets {start}-{stop} do not match its shape")
    if stop > data_size:
        raise FormatError(
            f"{path}: tensor {key!r} ends at byte {stop} of a {data_size}-byte data area "
            "(the file is truncated)"
        )
    return TensorInfo(dtype, shape, start, stop)


def map_file(
    path: str | os.PathLike[str], keys: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file; return its tensors (or only ``keys``) as views of the map.

    The mapping is private (copy-on-write): writing to a returned tensor never changes the file.
    Pages are read from disk only when touched.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise FormatError(f"{path}: truncated safetensors file ({file_size} bytes)")
            # One open, one map: the header is parsed from the mapping itself.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise FormatError(f"missing file: {path}") from None
    n = _header_length(path, mapped[:8], file_size)
    header = _parse_header(path, mapped[8 : 8 + n], file_size)
    if file_size == header.data_offset:
        return {k: _empty(i) for k, i in header.tensors.items() if keys is None or k in keys}
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    out = {}
    for key, info in header.tensors.items():
        if keys is None or key in keys:
            out[key] = _view(data, header.data_offset, info)
    return out


def _empty(info: TensorInfo) -> torch.Tensor:
    return torch.empty(info.shape, dtype=info.dtype)


def _view(data: torch.Tensor, base: int, info: TensorInfo) -> torch.Tensor:
    raw = data[base + info.start : base + info.stop]
    if info.stop == info.start:
        return _empty(info)
    if (base + info.start) % info.dtype.itemsize:
        raw = raw.clone()  # a foreign file with unaligned data: one copy of this tensor only
    return raw.view(info.dtype).reshape(info.shape)


def hash_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
