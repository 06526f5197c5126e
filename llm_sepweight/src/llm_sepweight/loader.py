"""Reading a part of a sepweight directory: only its files, memory-mapped."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import FormatError, IntegrityError
from .manifest import BEGIN, END, Manifest, mid_name, read_manifest
from .partspec import PartSpec
from .stfile import hash_file, map_file


@dataclass
class PartWeights:
    """The weights of one part: begin, layers by their global index, and end."""

    spec: PartSpec
    manifest: Manifest
    begin: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    end: dict[str, torch.Tensor] = field(default_factory=dict)

    def state_dict(
        self,
        *,
        begin_prefix: str = "",
        layer_prefix: str = "layers.",
        end_prefix: str = "",
        first_slot: int = 0,
    ) -> dict[str, torch.Tensor]:
        """One flat dict for ``load_state_dict``: the part's first layer goes to ``first_slot``.

        Layers 30-34 of a model, loaded with ``first_slot=0``, become ``layers.0.*`` ...
        ``layers.4.*`` of a module that holds just those five layers.
        """
        out = {begin_prefix + k: v for k, v in self.begin.items()}
        start = self.spec.layers.start
        for index, tensors in self.layers.items():
            slot = index - start + first_slot
            out.update({f"{layer_prefix}{slot}.{k}": v for k, v in tensors.items()})
        out.update({end_prefix + k: v for k, v in self.end.items()})
        return out


def files(directory: str | os.PathLike[str], spec: str | PartSpec) -> list[Path]:
    """The files a node holding ``spec`` needs (the manifest first), in load order."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    part = PartSpec.parse(spec).resolve(manifest.num_layers)
    names = ["manifest.json"] + _weight_files(part)
    names += [n for n in manifest.files if not n.endswith(".safetensors")]  # tokenizer etc.
    return [directory / n for n in names]


def _weight_files(part: PartSpec) -> list[str]:
    names = [BEGIN] if part.begin else []
    names += [mid_name(i) for i in part.layers]
    return names + ([END] if part.end else [])


def _check_file(directory: Path, manifest: Manifest, name: str, verify: bool) -> Path:
    path = directory / name
    entry = manifest.files.get(name)
    if entry is None:
        raise FormatError(f"{path}: not listed in the manifest of {directory}")
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise FormatError(f"{path} is missing (listed in the manifest of {directory})") from None
    if size != entry["bytes"]:
        raise IntegrityError(
            f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        )
    if verify and hash_file(path) != entry["sha256"]:
        raise IntegrityError(f"{path}: sha256 does not match the manifest (the file is corrupt)")
    return path


def load(
    directory: str | os.PathLike[str],
    spec: str | PartSpec = "f",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = False,
) -> PartWeights:
    """Load the weights of part ``spec`` from a sepweight directory.

    Only the part's files are opened; each is memory-mapped, so on the CPU with no ``dtype``
    change nothing is read until a tensor is touched. ``device`` / ``dtype`` move or convert the
    floating-point tensors (that materialises them). ``verify=True`` re-hashes the part's files
    against the manifest first. Sizes are always checked, so a truncated file is an error.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    part = PartSpec.parse(spec).resolve(manifest.num_layers)
    for name in _weight_files(part):
        _check_file(directory, manifest, name, verify)

    def read(name: str) -> dict[str, torch.Tensor]:
        tensors = map_file(directory / name)
        return {k: _place(v, device, dtype) for k, v in tensors.items()}

    weights = PartWeights(part, manifest)
    if part.begin:
        weights.begin = read(BEGIN)
    weights.layers = {i: read(mid_name(i)) for i in part.layers}
    if part.end:
        weights.end = read(END)
    return weights


def _place(
    t: torch.Tensor, device: str | torch.device | None, dtype: torch.dtype | None
) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t if device is None else t.to(device)


def verify(
    directory: str | os.PathLike[str],
    *,
    part: str | PartSpec | None = None,
    progress: bool = False,
) -> Manifest:
    """Re-hash the files against the manifest; raise naming the first bad or missing file.

    Without ``part``, every file the manifest lists (and the manifest lists every layer). With
    ``part`` (a spec such as ``"10-20"``), only the files :func:`files` gives for that part:
    a node that holds just those files checks them. The manifest is read and checked either way.
    Returns the manifest.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    manifest = read_manifest(directory)
    if part is None:
        for name in (mid_name(i) for i in range(manifest.num_layers)):
            if name not in manifest.files:
                raise FormatError(f"{directory / name} is not listed in the manifest")
        names = list(manifest.files)
    else:
        names = [p.name for p in files(directory, part)[1:]]  # [0] is the manifest itself
    for name in tqdm(names, desc="verify", unit="file", disable=not progress):
        _check_file(directory, manifest, name, verify=True)
    return manifest
