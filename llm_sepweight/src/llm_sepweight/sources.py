"""Source checkpoints, read lazily: tensor names first, then one tensor at a time.

Supported: a Hugging Face model directory (``model.safetensors``, sharded safetensors with their
index, ``pytorch_model*.bin`` read with ``weights_only=True``), a GGUF file (dequantized to
float32 with the ``gguf`` package), the original project's ``.pth`` sepweight layout
(``begin.pth``, ``mid.NNNNN.pth``, ``end.pth``) and a state dict in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError, FormatError
from .manifest import MANIFEST, is_weight_file, read_manifest
from .stfile import map_file, read_header

log = logging.getLogger(__name__)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "generation_config.json",
)  # fmt: skip
_OLD_MID = re.compile(r"^mid\.(\d+)\.pth$")


@dataclass
class Source:
    """A checkpoint opened for conversion: its keys, a getter, and what it says about itself."""

    kind: str
    keys: list[str]
    get: Callable[[str], torch.Tensor]
    config: dict[str, Any] | None = None
    gguf_arch: str | None = None
    fingerprint: str = ""
    tokenizer_files: list[Path] = field(default_factory=list)
    gguf_tokenizer: bool = False  # the GGUF file carries a vocabulary
    gguf_facts: dict[str, Any] = field(default_factory=dict)  # see ``gguf_facts``


def fingerprint(paths: list[Path], *extra: object) -> str:
    """Identifies a source by its files' names, sizes and modification times (for resuming)."""
    digest = hashlib.sha256(repr(extra).encode())
    for p in sorted(paths):
        st = p.stat()
        digest.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def open_source(src: Any) -> Source:
    """Open ``src``: a path (directory or ``.gguf`` file) or a state dict."""
    if isinstance(src, Mapping):
        bad = [k for k, v in src.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ConversionError(f"state dict values must be tensors; not for {bad[:5]}")
        return Source("state-dict", list(src.keys()), src.__getitem__)
    path = Path(src)
    if not path.exists():
        raise ConversionError(f"source {path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return open_gguf(path)
    if path.is_file():
        raise ConversionError(f"{path}: a file source must be a .gguf; give a directory otherwise")
    if (path / "begin.pth").exists() or any(_OLD_MID.match(p.name) for p in path.iterdir()):
        return _open_old_pth(path)
    return _open_hf(path)


def _read_config(directory: Path) -> dict[str, Any] | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None


def _open_hf(directory: Path) -> Source:
    config = _read_config(directory)
    tokenizer = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if (directory / "model.safetensors.index.json").is_file():
        shards = _index(directory / "model.safetensors.index.json")
        return _safetensors_source("hf-sharded-safetensors", directory, shards, config, tokenizer)
    # sepweight's own files are never a source: a directory may hold a conversion into itself
    singles = sorted(p for p in directory.glob("*.safetensors") if not is_weight_file(p.name))
    if singles:
        shards = {k: p.name for p in singles for k in read_header(p).tensors}
        return _safetensors_source("hf-safetensors", directory, shards, config, tokenizer)
    if (directory / "pytorch_model.bin.index.json").is_file():
        shards = _index(directory / "pytorch_model.bin.index.json")
        return _bin_source(directory, shards, config, tokenizer)
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        shards = {k: p.name for p in bins for k in _torch_load(p)}
        return _bin_source(directory, shards, config, tokenizer)
    _refuse_sepweight(directory)
    raise ConversionError(
        f"{directory}: no model.safetensors, sharded safetensors index, pytorch_model*.bin, "
        "begin.pth/mid.NNNNN.pth layout or .gguf found"
    )


def _refuse_sepweight(directory: Path) -> None:
    """A sepweight directory (finished or not) as a source says so, in place of "no weights"."""
    if (directory / MANIFEST).is_file():
        try:
            m = read_manifest(directory)
        except FormatError:
            return  # some other manifest.json: the generic message fits
        what = f"{directory} is already a sepweight directory ({m.arch}, {m.num_layers} layers)"
        raise ConversionError(
            f"{what}: nothing to convert; load it as it is (verify() checks its files)",
            cli_message=f"{what}: nothing to convert (llm-sepweight verify {directory} "
            "checks its files)",
        )
    if any(is_weight_file(p.name) for p in directory.iterdir()):
        raise ConversionError(
            f"{directory} holds sepweight files but no manifest: it is the output of a "
            "conversion that did not finish, not a source; run that conversion again"
        )


def _index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{path}: not a valid shard index ({exc})") from None
    for shard in set(weight_map.values()):
        if not (path.parent / shard).is_file():
            raise ConversionError(f"{path} names shard {shard}, which is missing")
    return dict(weight_map)


def _safetensors_source(
    kind: str, directory: Path, shards: dict[str, str], config: Any, tokenizer: list[Path]
) -> Source:
    mapped: dict[str, dict[str, torch.Tensor]] = {}

    def get(key: str) -> torch.Tensor:
        shard = shards[key]
        if shard not in mapped:  # maps are lazy views: keeping them costs no RAM
            mapped[shard] = map_file(directory / shard)
        return mapped[shard][key]

    paths = sorted({directory / s for s in shards.values()})
    return Source(kind, list(shards), get, config, None, fingerprint(paths), tokenizer)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True``, memory-mapped where the file format allows."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
        log.warning("%s is in the legacy torch format: reading it whole into RAM", path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise ConversionError(f"{path}: cannot be read with weights_only=True: {exc}") from None


def _bin_source(directory: Path, shards: dict[str, str], config: Any, tok: list[Path]) -> Source:
    loaded: dict[str, dict[str, torch.Tensor]] = {}

    def get(key: str) -> torch.Tensor:
        shard = shards[key]
        if shard not in loaded:
            loaded[shard] = _torch_load(directory / shard)
        return loaded[shard][key]

    paths = sorted({directory / s for s in shards.values()})
    return Source("hf-bin", list(shards), get, config, None, fingerprint(paths), tok)


def _open_old_pth(directory: Path) -> Source:
    """The original project's layout; keys become ``"<file stem>/<key>"`` (see ``old_decider``)."""
    files = sorted(p for p in directory.glob("*.pth") if p.name in ("begin.pth", "end.pth")
                   or _OLD_MID.match(p.name))  # fmt: skip
    shards: dict[str, str] = {}
    for p in files:
        for key in _torch_load(p):
            shards[f"{p.stem}/{key}"] = p.name
    loaded: dict[str, dict[str, torch.Tensor]] = {}

    def get(key: str) -> torch.Tensor:
        shard = shards[key]
        if shard not in loaded:
            loaded.clear()  # one old file at a time
            loaded[shard] = _torch_load(directory / shard)
        return loaded[shard][key.split("/", 1)[1]]

    config = _read_config(directory)
    return Source("old-pth", list(shards), get, config, None, fingerprint(files), [])


def old_decider(key: str) -> tuple[str, str] | tuple[str, int, str]:
    """Places the keys of an old ``.pth`` layout (``"mid.00003/x.weight"``) where they were."""
    stem, inner = key.split("/", 1)
    if stem == "begin":
        return ("begin", inner)
    if stem == "end":
        return ("end", inner)
    return ("mid", int(stem.split(".")[1]), inner)


def open_gguf(path: Path) -> Source:
    """A GGUF file: metadata as config, tensors dequantized to float32 one at a time."""
    try:
        import gguf
    except ImportError:
        raise ConversionError(
            "reading GGUF needs the gguf package: pip install 'llm_sepweight[gguf]'"
        ) from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise FormatError(f"{path}: not a readable GGUF file ({exc})") from None
    metadata = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}

    def get(key: str) -> torch.Tensor:
        return _dequantize(gguf, tensors[key])

    arch = metadata.get("general.architecture")
    has_vocab = "tokenizer.ggml.model" in reader.fields
    facts = gguf_facts(reader)
    return Source(
        "gguf", list(tensors), get, metadata, arch, fingerprint([path]), [], has_vocab, facts
    )


def gguf_facts(reader: Any) -> dict[str, Any]:
    """What a model package may need beyond the metadata to write a config.

    ``sepweight.tensor_names`` (e.g. whether ``output.weight`` exists: untied head) and
    ``sepweight.vocab_size`` (the number of tokens in the vocabulary, for files whose metadata
    lacks ``<arch>.vocab_size``). Passed to ``Architecture.config_from_gguf`` only, never stored.
    """
    facts: dict[str, Any] = {"sepweight.tensor_names": [t.name for t in reader.tensors]}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        facts["sepweight.vocab_size"] = len(tokens.data)
    return facts


def _dequantize(gguf: Any, t: Any, rows_per_chunk: int = 1024) -> torch.Tensor:
    """One GGUF tensor as float32 in torch order, dequantized a block of rows at a time.

    The output is allocated once; only one chunk's temporaries exist besides it, so the peak
    memory of a conversion stays near the size of its largest tensor.
    """
    import numpy as np

    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    out = np.empty(shape, dtype=np.float32)
    rows = out.reshape(-1, shape[-1]) if shape else out.reshape(1, 1)
    data = t.data.reshape(rows.shape[0], -1)
    for i in range(0, rows.shape[0], rows_per_chunk):
        chunk = gguf.quants.dequantize(data[i : i + rows_per_chunk], t.tensor_type)
        rows[i : i + rows_per_chunk] = chunk.reshape(-1, rows.shape[1])
    return torch.from_numpy(out)


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key-value metadata as Python values, without the large ``tokenizer.*`` arrays."""
    out = {}
    for key, value in reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.ggml.")):
            continue
        contents = value.contents()
        out[key] = contents.item() if hasattr(contents, "item") else contents
    return out
