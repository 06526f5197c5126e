"""``convert``: any supported checkpoint to a sepweight directory."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .architecture import Architecture, find_architecture
from .decider import Decider, gguf_decider
from .errors import ConversionError
from .manifest import Manifest
from .sources import Source, old_decider, open_source
from .stfile import fsync_dir, temp_path
from .writer import DirectoryWriter, _check_layer_count, dtype_str, parse_dtype, plan, write_planned

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
) -> Manifest:
    """Convert a checkpoint to a sepweight directory; return the manifest written.

    ``src`` is a Hugging Face model directory (single or sharded safetensors, ``.bin``), a
    ``.gguf`` file, a directory in the original ``.pth`` sepweight layout, or a state dict.
    Without ``decider``, the model package registered for the checkpoint's architecture
    (``config["model_type"]``, GGUF ``general.architecture`` or ``arch``) places the keys; GGUF
    files with no such package keep llama.cpp's names. ``dtype`` converts floating-point tensors.
    Running the same conversion again after it was killed resumes where it stopped.
    """
    source = open_source(src)
    config = dict(config if config is not None else source.config or {})
    target = parse_dtype(dtype)
    get, keys = source.get, source.keys
    architecture = None if decider is not None else _architecture(source, config, arch)
    if architecture is not None:
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
    stamp = f"{source.fingerprint}|{stored_dtype or ''}|{arch_name}"
    writer = DirectoryWriter(out_dir, fingerprint=stamp if source.fingerprint else "")
    write_planned(the_plan, get, writer, dtype=target, progress=progress)
    extra = _copy_tokenizer(source, src, writer.dir)
    return writer.finish(arch_name, config, num_layers, stored_dtype, extra)


def _architecture(
    source: Source, config: Mapping[str, Any], arch: str | None
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
        raise ConversionError(
            "cannot tell the architecture: the source has no config with a 'model_type'; "
            "pass arch=..., config=... or an explicit decider"
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
