"""The exception type of this package: Llama configs and checkpoints it cannot run.

What every family refuses alike is raised as llm_slice_core's shared meanings (``InputError`` for
``x`` or ``mask``, ``CacheError``, ``WeightsError``; a bad part spec as
``llm_sepweight.PartSpecError``); this class is the Llama-specific one and, like them, a
``llm_slice_core.SliceError``.
"""

from llm_slice_core import SliceError


class LlamaModelError(SliceError):
    """A Llama config or checkpoint this package cannot run (the message names the field)."""
