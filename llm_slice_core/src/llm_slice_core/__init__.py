"""llm_slice_core: what every model slice shares, written once.

- :mod:`.positions` -- the padding mask's checks, positions from the mask and the cache, which
  keys each new token may see (:class:`Slots`);
- :mod:`.cache` -- :class:`KVCache` (buffers at the KV-head count, slot bookkeeping, rows that
  leave and join a running batch);
- :mod:`.part` -- :class:`ModelPart`, the base of every family's part: weights, cache, the
  ``prepare`` -> layers -> ``complete`` driver, weightless layers for streaming;
- :mod:`.packing`, :mod:`.products` and :mod:`.attention` -- the CPU speed machinery: packed
  weights (:class:`Linears`), products of several rows on oneDNN and of one row cut into one
  block per thread (custom op ``llm_slice_core::product_in_blocks`` under ``torch.compile``),
  decode attention as one product per key/value head (:func:`attend`);
- :mod:`.errors` -- the shared meanings of what a part refuses.
"""

from .attention import attend
from .cache import KVCache, LayerKV, cache_bytes
from .errors import CacheError, InputError, SliceError, WeightsError
from .packing import Linears
from .part import ModelPart
from .positions import Slots, additive_mask, allowed_keys, check_mask, new_positions
from .products import SPLIT_MAX_ROWS, product, thread_splits

__all__ = [
    "SPLIT_MAX_ROWS", "CacheError", "InputError", "KVCache", "LayerKV", "Linears", "ModelPart",
    "SliceError", "Slots", "WeightsError", "additive_mask", "allowed_keys", "cache_bytes",
    "attend", "check_mask", "new_positions", "product", "thread_splits",
]  # fmt: skip
