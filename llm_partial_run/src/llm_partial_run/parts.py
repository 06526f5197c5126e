"""Loading a part of any installed model family, and what the driver asks of a loaded part.

The model package is found from the manifest's architecture through the ``llm_microlibs.models``
entry points (``llm_sepweight.find_architecture``), never imported by name. A part held whole
on its device ("resident") comes from the package's ``load_part``; a part that streams its
layers' weights (at most K on the device at once) from :mod:`llm_partial_run.streaming`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch

from llm_sepweight import IntegrityError, Manifest, PartSpec, find_architecture, read_manifest
from llm_sepweight import files as part_files

from .errors import PartialRunError, SessionError

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``, ``"bf16"``, ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if found is None:
        raise PartialRunError(
            f"dtype {dtype!r} is not known: use one of float32, bfloat16, float16, float64"
        )
    return found


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def verify_part(directory: str | os.PathLike[str], spec: str | PartSpec) -> None:
    """Re-hash the files part ``spec`` needs against the manifest; IntegrityError names the first
    bad one. Uses ``llm_sepweight.verify(directory, part=spec)`` when that exists."""
    from llm_sepweight import verify

    if "part" in inspect.signature(verify).parameters:
        verify(directory, part=spec)
        return
    # Fallback until llm_sepweight.verify takes part=: hash only the part's files ourselves.
    manifest = read_manifest(directory)
    for path in part_files(directory, spec):
        entry = manifest.files.get(path.name)
        if entry is None:  # manifest.json itself
            continue
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (listed in the manifest of {directory})")
        if _sha256(path) != entry["sha256"]:
            raise IntegrityError(f"{path}: sha256 does not match the manifest (corrupt file)")


def fingerprint(manifest: Manifest) -> str:
    """16 hex digits identifying a model's weights: a digest of its weight files' names and
    sha256s in the manifest (every copy of a directory has the same; another model does not)."""
    digest = hashlib.sha256()
    for name in sorted(manifest.files):
        if name.endswith(".safetensors"):
            digest.update(f"{name}={manifest.files[name]['sha256']};".encode())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_any_part(
    directory: str | os.PathLike[str],
    spec: str | PartSpec = "f",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    pack: bool = True,
    verify: bool = True,
    resident_layers: int | None = None,
    packed_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Load part ``spec`` of the sepweight model in ``directory``, whatever its family.

    ``verify`` re-hashes the part's files first (a flipped byte must not serve wrong answers).
    With ``resident_layers=K`` the part streams its layers' weights, at most K on the device at
    once (:func:`llm_partial_run.streaming.load_streamed`); otherwise it is loaded whole. A
    streamed part with ``pack`` streams packed layer files kept in ``packed_dir`` (made once;
    ``verify`` re-hashes those found too); ``pack=False`` streams the model's own files.
    Raises ``llm_sepweight`` errors for a bad directory, spec or file.
    """
    spec = PartSpec.parse(spec)
    dtype = parse_dtype(dtype)
    manifest = read_manifest(directory)
    spec = spec.resolve(manifest.num_layers)
    if resident_layers is not None:
        from .streaming import load_streamed

        return load_streamed(
            directory, spec, resident_layers=resident_layers, device=device, dtype=dtype,
            pack=None if pack else False, packed_dir=packed_dir, verify=verify,
        )  # fmt: skip
    if verify:
        verify_part(directory, spec)
    load_part = find_architecture(name=manifest.arch).load_part
    if load_part is None:
        raise PartialRunError(
            f"the installed package for architecture {manifest.arch!r} cannot load parts"
        )
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if "pack" in inspect.signature(load_part).parameters:  # fallback: not every family packs yet
        kwargs["pack"] = pack
    log.info("loading part %s of %s (%s)", spec, directory, manifest.arch)
    return load_part(directory, spec, **kwargs)


def cache_bytes(part: Any, batch_size: int, max_len: int) -> int:
    """The bytes ``part.new_cache(batch_size, max_len)`` would allocate, known before it does.

    Uses ``part.cache_bytes``; a part without it (the contract's method not landed yet) is
    measured on a one-row, one-position cache and scaled (fallback, marked as such).
    """
    method = getattr(part, "cache_bytes", None)
    if method is not None:
        return int(method(batch_size, max_len))
    probe = part.new_cache(1, 1)  # fallback: a tiny cache, scaled
    layers = getattr(probe, "layers", [])
    per_slot = 0
    for layer in layers:
        per_slot += sum(t.nbytes for t in vars(layer).values() if isinstance(t, torch.Tensor))
    return per_slot * batch_size * max_len


def keep_rows(cache: Any, rows: list[int]) -> None:
    """``cache.keep_rows(rows)``; a clear refusal where the family's cache cannot yet."""
    method = getattr(cache, "keep_rows", None)
    if method is None:
        raise SessionError(f"this part's cache ({type(cache).__name__}) cannot drop rows yet")
    method(rows)


def join(cache: Any, other: Any) -> None:
    """``cache.join(other)``; a clear refusal where the family's cache cannot yet."""
    method = getattr(cache, "join", None)
    if method is None:
        raise SessionError(f"this part's cache ({type(cache).__name__}) cannot join rows yet")
    method(other)


def cache_rows(cache: Any) -> int:
    """Rows in use in ``cache`` (``cache.rows``, else its capacity)."""
    rows = getattr(cache, "rows", None)
    return int(rows if rows is not None else cache.batch_size)
