"""Writing a sepweight directory: plan where every tensor goes, then write file by file.

Memory: the writer holds the tensors of one output file at a time (one layer), fetched lazily
from the source, so a checkpoint larger than RAM converts. Safety: every file is written under a
temporary name and renamed into place; ``manifest.json`` is removed first and written last, so a
directory with a manifest is always complete. A journal (``.sepweight-progress.json``) records
each finished file under a fingerprint of the conversion (source files, options, plan); a
conversion killed half-way and run again with the same source and options skips the files that
are already done. The journal stays after the manifest is written, marked finished, so the same
conversion run again finds its output up to date and writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .decider import Decider, file_of, placements
from .errors import ConversionError, SepweightError
from .manifest import (
    BEGIN,
    END,
    MANIFEST,
    Manifest,
    is_weight_file,
    mid_name,
    read_manifest,
    write_manifest,
)
from .stfile import fsync_dir, temp_path, write_file

log = logging.getLogger(__name__)
JOURNAL = ".sepweight-progress.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"bfloat16"``, ``torch.bfloat16`` ... -> a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise SepweightError(f"dtype {dtype} not supported: use float32, bfloat16 or float16")
        return dtype
    aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
               "f16": "float16", "half": "float16", "float": "float32"}  # fmt: skip
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise SepweightError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return DTYPES[name]


def dtype_str(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass
class Plan:
    """For each output file, the (destination key, source key) pairs it holds."""

    files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, source_key: str, decider: Decider) -> None:
        """Place one source key (possibly in several files, possibly nowhere)."""
        found = placements(decider, source_key)
        if not found:
            self.skipped.append(source_key)
        for placement in found:
            entries = self.files.setdefault(file_of(placement), [])
            entries.append((placement[-1], source_key))

    def num_layers(self) -> int:
        """Layer count implied by the planned files; checks that no layer is missing."""
        return layer_count(self.files)

    def check_unique(self) -> None:
        """Two source keys must never land on the same destination key of one file."""
        for name, entries in self.files.items():
            counts = Counter(dest for dest, _ in entries)
            dupes = [k for k, n in counts.items() if n > 1]
            if dupes:
                raise ConversionError(f"several source keys map to {dupes} in {name}")


def layer_count(file_names: Iterable[str]) -> int:
    """How many layers the ``mid.NNNNN`` files among ``file_names`` hold; none may be missing."""
    layers = sorted(int(name.split(".")[1]) for name in file_names if name.startswith("mid."))
    missing = sorted(set(range(layers[-1] + 1)) - set(layers)) if layers else []
    if missing:
        raise ConversionError(f"the source has no tensors for layers {missing}")
    return len(layers)


def plan(keys: Iterable[str], decider: Decider) -> Plan:
    """Decide where each of ``keys`` goes."""
    result = Plan()
    for key in keys:
        result.add(key, decider)
    result.check_unique()
    if not result.files:
        raise ConversionError("the decider placed no tensor at all")
    return result


class DirectoryWriter:
    """Writes the files of one sepweight directory, resumable through its journal."""

    def __init__(
        self, out_dir: str | os.PathLike[str], fingerprint: str, *, resume: bool = True
    ) -> None:
        self.dir = Path(out_dir)
        _check_out_dir(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MANIFEST).unlink(missing_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
        self.fingerprint = fingerprint
        self.done: dict[str, dict[str, Any]] = self._read_journal() if resume else {}

    def _read_journal(self) -> dict[str, dict[str, Any]]:
        journal = _journal(self.dir, self.fingerprint)
        if journal is None:
            return {}
        done = {}
        for name, entry in dict(journal.get("files", {})).items():
            path = self.dir / name
            if path.is_file() and path.stat().st_size == entry.get("bytes"):
                done[name] = entry
        if done:
            log.info("resuming: %d files already written in %s", len(done), self.dir)
        return done

    def _write_journal(self, finished: bool = False) -> None:
        path = self.dir / JOURNAL
        tmp = temp_path(path)
        record = {"fingerprint": self.fingerprint, "files": self.done, "finished": finished}
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def is_done(self, name: str) -> bool:
        """True when ``name`` was completely written by an earlier run of the same conversion."""
        return name in self.done

    def write(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write one file atomically and record it in the journal."""
        sha256, nbytes = write_file(self.dir / name, tensors)
        self.done[name] = {"sha256": sha256, "bytes": nbytes, "dtypes": _dtype_bytes(tensors)}
        self._write_journal()

    def finish(self, arch: str, config: Mapping[str, Any], num_layers: int,
               dtype: str | None, extra: Iterable[str] = ()) -> Manifest:  # fmt: skip
        """Write the manifest last, then mark the journal finished (or drop it: no fingerprint)."""
        from .stfile import hash_file

        expected = {BEGIN, END, *(mid_name(i) for i in range(num_layers))}
        files = {n: {"sha256": e["sha256"], "bytes": e["bytes"]} for n, e in self.done.items()
                 if n in expected}  # fmt: skip
        for stale in self.dir.glob("*.safetensors"):  # left by an earlier, larger conversion
            if is_weight_file(stale.name) and stale.name not in files:
                stale.unlink()  # never a file of another name: out_dir may hold the source
        for name in extra:
            path = self.dir / name
            files[name] = {"sha256": hash_file(path), "bytes": path.stat().st_size}
        if dtype is None:
            dtype = _dominant_dtype(self.done.values())
        manifest = Manifest(arch=arch, num_layers=num_layers, dtype=dtype,
                            config=dict(config), files=dict(sorted(files.items())))  # fmt: skip
        write_manifest(self.dir, manifest)
        if self.fingerprint:
            self._write_journal(finished=True)
        else:  # a conversion that cannot be identified is never found up to date
            (self.dir / JOURNAL).unlink(missing_ok=True)
        fsync_dir(self.dir)
        return manifest


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output {out_dir} exists and is not a directory")


def _journal(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The journal of ``out_dir`` when it was written by the conversion ``fingerprint``."""
    if not fingerprint:
        return None  # a source that cannot be identified (in memory) is never resumed
    try:
        journal = json.loads((out_dir / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict) or journal.get("fingerprint") != fingerprint:
        return None
    return journal


def finished_output(out_dir: str | os.PathLike[str], fingerprint: str) -> Manifest | None:
    """The manifest of ``out_dir`` when the conversion ``fingerprint`` completed there.

    Up to date means: the journal of that conversion says it finished, the manifest reads, and
    every file it lists exists with its recorded size. Files are not re-hashed (``verify`` does).
    """
    out_dir = Path(out_dir)
    journal = _journal(out_dir, fingerprint)
    if journal is None or journal.get("finished") is not True:
        return None
    try:
        manifest = read_manifest(out_dir)
    except SepweightError:
        return None
    for name, entry in manifest.files.items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return None
    return manifest


def _dtype_bytes(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for t in tensors.values():
        counts[dtype_str(t.dtype)] += t.numel() * t.element_size()
    return dict(counts)


def _dominant_dtype(entries: Iterable[dict[str, Any]]) -> str:
    total: Counter[str] = Counter()
    for entry in entries:
        total.update(entry.get("dtypes", {}))
    floats = Counter({k: v for k, v in total.items() if k.startswith(("float", "bfloat"))})
    best = (floats or total).most_common(1)
    return best[0][0] if best else "float32"


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Convert floating-point tensors to ``dtype``; integer and bool tensors stay as they are."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


def write_planned(
    the_plan: Plan,
    get: Callable[[str], torch.Tensor],
    writer: DirectoryWriter,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> None:
    """Write every planned file, fetching each source tensor once per file it lands in."""
    from tqdm.auto import tqdm

    names = sorted(the_plan.files, key=_file_order)
    for name in tqdm(names, desc="sepweight", unit="file", disable=not progress):
        if writer.is_done(name):
            continue
        tensors = {dest: cast(get(src), dtype) for dest, src in the_plan.files[name]}
        writer.write(name, tensors)
        del tensors


def _file_order(name: str) -> tuple[int, str]:
    return (0 if name == BEGIN else 2 if name == END else 1, name)


def dump(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike[str],
    decider: Decider,
    *,
    arch: str = "unknown",
    config: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
) -> Manifest:
    """Write ``tensors`` (a state dict, or an iterable of (name, tensor)) as a sepweight directory.

    ``decider`` places each name (see :mod:`llm_sepweight.decider`); ``dtype`` optionally converts
    floating-point tensors to float32, bfloat16 or float16. Returns the written manifest.

    A mapping is written file by file. An iterable is consumed once, in order, holding only the
    tensors of the file being filled; when a later tensor belongs to a file already written (a
    source not ordered by layer), that file is read back from its memory map and rewritten.
    """
    target = parse_dtype(dtype)
    writer = DirectoryWriter(out_dir, fingerprint="")  # tensors in memory cannot be resumed
    if isinstance(tensors, Mapping):
        the_plan = plan(tensors.keys(), decider)
        write_planned(the_plan, tensors.__getitem__, writer, dtype=target, progress=progress)
        num_layers = the_plan.num_layers()
    else:
        num_layers = _dump_stream(tensors, decider, writer, target)
    _check_layer_count(num_layers, config)
    return writer.finish(arch, config or {}, num_layers, dtype_str(target) if target else None)


def _dump_stream(
    items: Iterable[tuple[str, torch.Tensor]],
    decider: Decider,
    writer: DirectoryWriter,
    dtype: torch.dtype | None,
) -> int:
    from .stfile import map_file

    pending: dict[str, dict[str, torch.Tensor]] = {}
    written: set[str] = set()

    def flush(name: str) -> None:
        group = pending.pop(name)
        if name in written:  # late tensors for a file already on disk: merge them in
            old = map_file(writer.dir / name)
            clash = set(old) & set(group)
            if clash:
                raise ConversionError(f"several source keys map to {sorted(clash)} in {name}")
            group = {**old, **group}
        writer.write(name, group)
        written.add(name)

    current: str | None = None
    for key, tensor in items:
        for placement in placements(decider, key):
            name = file_of(placement)
            if name != current and current in pending:
                flush(current)
            current = name
            group = pending.setdefault(name, {})
            if placement[-1] in group:
                raise ConversionError(f"several source keys map to {placement[-1]!r} in {name}")
            group[placement[-1]] = cast(tensor, dtype)
    for name in list(pending):
        flush(name)
    if not written:
        raise ConversionError("the decider placed no tensor at all")
    return layer_count(written)


def _check_layer_count(num_layers: int, config: Mapping[str, Any] | None) -> None:
    expected = None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if config and isinstance(config.get(key), int):
            expected = config[key]
            break
    if expected is not None and expected != num_layers:
        raise ConversionError(
            f"the config says {expected} layers but the checkpoint has tensors for {num_layers}"
        )
