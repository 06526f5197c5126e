"""llm_falcon_model: every Falcon variant as slices (begin, layers, end) with a compact KV cache.

>>> part = FalconPart(FalconConfig.from_hf("config.json"), "b 0-8")    # doctest: +SKIP
>>> cache = part.new_cache(batch_size=1, max_len=64)                    # doctest: +SKIP
>>> hidden = part(torch.tensor([[1, 2, 3]]), cache=cache)               # doctest: +SKIP
"""

from llm_slice_core import KVCache, LayerKV

from .config import FalconConfig
from .convert import ARCHITECTURE, decider
from .errors import FalconModelError
from .loading import load_part, part_from_state_dict
from .model import FalconPart

__all__ = [
    "ARCHITECTURE",
    "FalconConfig",
    "FalconModelError",
    "FalconPart",
    "KVCache",
    "LayerKV",
    "decider",
    "load_part",
    "part_from_state_dict",
]
