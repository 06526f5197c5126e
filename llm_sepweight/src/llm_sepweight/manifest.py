"""The manifest of a sepweight directory and the names of its files (format version 1)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FormatError
from .stfile import fsync_dir, temp_path

FORMAT = "sepweight"
VERSION = 1
MANIFEST = "manifest.json"
BEGIN = "begin.safetensors"
END = "end.safetensors"


def mid_name(layer: int) -> str:
    """File name of one layer: ``mid.00007.safetensors``."""
    return f"mid.{layer:05d}.safetensors"


def is_weight_file(name: str) -> bool:
    """True for the names this format gives its weight files (begin, mid.NNNNN, end)."""
    return name in (BEGIN, END) or re.fullmatch(r"mid\.\d{5}\.safetensors", name) is not None


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says: the model, and the sha256 and size of every file."""

    arch: str
    num_layers: int
    dtype: str
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object stored on disk."""
        return {
            "format": self.format, "version": self.version, "arch": self.arch,
            "num_layers": self.num_layers, "dtype": self.dtype, "config": self.config,
            "files": self.files,
        }  # fmt: skip

    @property
    def weight_bytes(self) -> int:
        """Total size of the weight files (begin, layers, end)."""
        return sum(v["bytes"] for k, v in self.files.items() if k.endswith(".safetensors"))


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and check ``manifest.json`` of a sepweight directory."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise FormatError(f"{directory} is not a directory")
    if not path.is_file():
        raise FormatError(
            f"{path} is missing: {directory} is not a finished sepweight directory "
            "(a conversion that did not complete leaves none; run it again)"
        )
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FormatError(f"{path} is not a sepweight manifest (format != {FORMAT!r})")
    if data.get("version") != VERSION:
        raise FormatError(
            f"{path} has format version {data.get('version')!r}; this reads {VERSION}"
        )
    try:
        return Manifest(
            arch=str(data["arch"]), num_layers=int(data["num_layers"]), dtype=str(data["dtype"]),
            config=dict(data.get("config") or {}), files=dict(data["files"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path} lacks or garbles a field: {exc}") from None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (it is the last file a conversion writes)."""
    path = directory / MANIFEST
    tmp = temp_path(path)
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)
