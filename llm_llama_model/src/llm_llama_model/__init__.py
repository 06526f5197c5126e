"""Llama-family model parts (begin, a range of layers, end) with an explicit KV cache.

part = load_part("smollm2-sepweight", "b 0-15", dtype=torch.float32)
cache = part.new_cache(batch_size=1, max_len=256)
hidden = part(ids, mask=None, cache=cache)
"""

from llm_slice_core import KVCache, LayerKV

from .config import LlamaConfig, RopeScaling
from .convert import ARCHITECTURE, config_from_gguf, decider, gguf_rename, gguf_transform
from .errors import LlamaModelError
from .loading import load_part, part_from_state_dict
from .model import LlamaPart

__all__ = [
    "ARCHITECTURE",
    "KVCache",
    "LayerKV",
    "LlamaConfig",
    "LlamaModelError",
    "LlamaPart",
    "RopeScaling",
    "config_from_gguf",
    "decider",
    "gguf_rename",
    "gguf_transform",
    "load_part",
    "part_from_state_dict",
]
