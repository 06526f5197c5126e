"""``convert``: any supported checkpoint to a sepweight directory."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .architecture import Architecture, architectures, find_architecture
from .decider import Decider, gguf_decider
from .errors import ConversionError, SepweightError
from .manifest import Manifest
from .sources import Source, fingerprint, old_decider, open_source
from .stfile import fsync_dir, temp_path
from .writer import (
    DirectoryWriter,
    Plan,
    _check_layer_count,
    dtype_str,
    finished_output,
    parse_dtype,
    plan,
    write_planned,
)

log = logging.getLogger(__name__)


def convert(
    src: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    decider: Decider | None = None,
    arch: str | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = False,
    force: bool = False,
) -> Manifest:
    """Convert a checkpoint to a sepweight directory; return the manifest written.

    ``src`` is a Hugging Face model directory (single or sharded safetensors, ``.bin``), a
    ``.gguf`` file, a directory in the original ``.pth`` sepweight layout, or a state dict.
    Without ``decider``, the model package registered for the checkpoint's architecture
    (``config["model_type"]``, GGUF ``general.architecture`` or ``arch``) places the keys; GGUF
    files with no such package keep llama.cpp's names. ``dtype`` converts floating-point tensors.
    Running the same conversion again after it was killed resumes where it stopped; running it
    again after it finished, with the source files unchanged, writes nothing and returns the
    manifest already there. ``force=True`` converts everything again.
    """
    manifest, _ = convert_or_reuse(src, out_dir, dtype=dtype, decider=decider, arch=arch,
                                   config=config, progress=progress, force=force)  # fmt: skip
    return manifest


def convert_or_reuse(
    src: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    decider: Decider | None = None,
    arch: str | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = False,
    force: bool = False,
) -> tuple[Manifest, bool]:
    """:func:`convert`, also saying whether anything was written (False: it was up to date)."""
    source = open_source(src)
    config = dict(config if config is not None else source.config or {})
    target = parse_dtype(dtype)
    get, keys = source.get, source.keys
    what = _describe(src)
    architecture = None if decider is not None else _architecture(source, config, arch, what)
    if architecture is not None:
        architecture = _guarded(architecture, what, arch)
        if source.kind == "gguf" and architecture.config_from_gguf is not None:
            config = architecture.config_from_gguf({**config, **source.gguf_facts})
        if source.kind == "gguf":
            keys, get = _gguf_renamed(source, architecture, config)
        decider = architecture.decider(config)
    elif decider is None:
        decider = gguf_decider() if source.kind == "gguf" else old_decider
    arch_name = arch or (architecture.name if architecture else None) or _arch_hint(source, config)

    the_plan = plan(keys, decider)
    if the_plan.skipped:
        log.info("skipped %d source tensors: %s", len(the_plan.skipped), the_plan.skipped[:8])
    num_layers = the_plan.num_layers()
    if source.kind != "gguf" or architecture is not None:
        _check_layer_count(num_layers, config)
    stored_dtype = dtype_str(target) if target else None
    stamp = _stamp(source, the_plan, config, stored_dtype, arch_name)
    if not force and (done := finished_output(out_dir, stamp)) is not None:
        log.info("%s is up to date: same source files, same options", out_dir)
        return done, False
    writer = DirectoryWriter(out_dir, fingerprint=stamp, resume=not force)
    write_planned(the_plan, get, writer, dtype=target, progress=progress)
    extra = _copy_tokenizer(source, src, writer.dir)
    return writer.finish(arch_name, config, num_layers, stored_dtype, extra), True


def _stamp(source: Source, the_plan: Plan, config: Mapping[str, Any], dtype: str | None,
           arch_name: str) -> str:  # fmt: skip
    """Identifies one conversion: the source files as they are now, the options and the plan.

    Empty for a source that cannot be identified (a state dict in memory): never resumed.
    """
    if not source.fingerprint:
        return ""
    digest = hashlib.sha256()
    for part in (source.fingerprint, fingerprint(source.tokenizer_files), dtype or "", arch_name,
                 json.dumps(config, sort_keys=True, default=str),
                 json.dumps(sorted(the_plan.files.items()))):  # fmt: skip
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def _describe(src: Any) -> str:
    return "the state dict" if isinstance(src, Mapping) else str(src)


def _guarded(architecture: Architecture, src: str, arch: str | None) -> Architecture:
    """The same architecture, its hooks' ``ValueError`` raised as a ConversionError.

    A hook refusing the checkpoint is what the plugin contract says a ``ValueError`` means (see
    :class:`Architecture`); the error then names the package and the source, and the ``arch``
    choice when one was given. Other exceptions pass through: they are the package's bugs.
    """

    def guard(hook: Any) -> Any:
        if hook is None:
            return None

        def call(*args: Any) -> Any:
            try:
                return hook(*args)
            except SepweightError:
                raise
            except ValueError as exc:
                raise _refused(architecture.name, src, arch, exc) from exc

        return call

    return replace(
        architecture,
        decider=guard(lambda config: guard(architecture.decider(config))),
        config_from_gguf=guard(architecture.config_from_gguf),
        gguf_rename=guard(architecture.gguf_rename),
        gguf_transform=guard(architecture.gguf_transform),
    )


def _refused(name: str, src: str, arch: str | None, exc: ValueError) -> ConversionError:
    message = f"the {name!r} model package cannot convert {src}: {exc}"
    if arch is None:
        return ConversionError(message)
    question = "was given: is that the checkpoint's architecture?"
    return ConversionError(
        f"{message} (arch={arch!r} {question})", cli_message=f"{message} (--arch {arch} {question})"
    )


def _architecture(
    source: Source, config: Mapping[str, Any], arch: str | None, src: str
) -> Architecture | None:
    if source.kind == "old-pth":
        return None  # its files already say where each tensor goes; ``arch`` only labels it
    if arch is not None:
        return find_architecture(name=arch)
    if source.kind == "gguf":
        try:
            return find_architecture(gguf=source.gguf_arch)
        except ConversionError:
            log.info("no model package for GGUF architecture %r: keeping GGUF names",
                     source.gguf_arch)  # fmt: skip
            return None
    model_type = config.get("model_type")
    if model_type is None:
        known = ", ".join(sorted(a.name for a in architectures())) or "none"
        problem = f"cannot tell the architecture of {src}: no config.json with a 'model_type'"
        raise ConversionError(
            f"{problem}; pass arch= (installed: {known}), config= or an explicit decider",
            cli_message=f"{problem}; name it with --arch (installed: {known})",
        )
    return find_architecture(model_type=model_type)


def _arch_hint(source: Source, config: Mapping[str, Any]) -> str:
    return source.gguf_arch or str(config.get("model_type") or "unknown")


def _gguf_renamed(source: Source, architecture: Architecture, config: Mapping[str, Any]):
    if architecture.gguf_rename is None:
        return source.keys, source.get
    renamed = {}
    for key in source.keys:
        new = architecture.gguf_rename(key)
        if new is not None:
            renamed[new] = key
    transform = architecture.gguf_transform

    def get(hf_key: str) -> torch.Tensor:
        tensor = source.get(renamed[hf_key])
        return transform(hf_key, tensor, config) if transform else tensor

    return list(renamed), get


def _copy_tokenizer(source: Source, src: Any, out_dir: Path) -> list[str]:
    """Copy tokenizer files next to the weights; for GGUF, rebuild them with transformers."""
    names = []
    for path in source.tokenizer_files:
        if path.resolve() == (out_dir / path.name).resolve():  # converting into the source
            names.append(path.name)
            continue
        tmp = temp_path(out_dir / path.name)
        shutil.copyfile(path, tmp)
        os.replace(tmp, out_dir / path.name)
        names.append(path.name)
    if source.gguf_tokenizer:
        names += _gguf_tokenizer(Path(src), out_dir)
    fsync_dir(out_dir)
    return names


def _gguf_tokenizer(path: Path, out_dir: Path) -> list[str]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.warning("transformers is not installed: the GGUF tokenizer is not carried over")
        return []
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # an unusual vocabulary must not fail the weights
        log.warning("cannot rebuild the tokenizer of %s: %s", path, exc)
        return []
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
        for name in names:
            os.replace(Path(tmp) / name, out_dir / name)
    return names
