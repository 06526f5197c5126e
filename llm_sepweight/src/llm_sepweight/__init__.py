"""llm_sepweight: a weight format with one file per layer, so a node loads only its layers.

A sepweight directory holds ``manifest.json``, ``begin.safetensors``, ``mid.NNNNN.safetensors``
(one per layer) and ``end.safetensors``, plus tokenizer files when the source had them.
"""

from .architecture import GROUP, Architecture, architectures, find_architecture
from .convert import convert, convert_or_reuse
from .decider import Decider, Placement, gguf_decider, prefix_decider
from .errors import ConversionError, FormatError, IntegrityError, PartSpecError, SepweightError
from .loader import PartWeights, files, load, verify
from .manifest import Manifest, read_manifest
from .partspec import PartSpec
from .writer import dump

__all__ = [
    "GROUP", "Architecture", "ConversionError", "Decider", "FormatError", "IntegrityError",
    "Manifest", "PartSpec", "PartSpecError", "PartWeights", "Placement", "SepweightError",
    "architectures", "convert", "convert_or_reuse", "dump", "files", "find_architecture",
    "gguf_decider", "load", "prefix_decider", "read_manifest", "verify",
]  # fmt: skip
