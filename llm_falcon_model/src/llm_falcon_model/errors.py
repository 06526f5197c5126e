"""The exception type of llm_falcon_model: Falcon configs and checkpoints it cannot run.

What every family refuses alike is raised as llm_slice_core's shared meanings (``InputError`` for
``x`` or ``mask``, ``CacheError``, ``WeightsError``; a bad part spec as
``llm_sepweight.PartSpecError``); this class is the Falcon-specific one and, like them, a
``llm_slice_core.SliceError``.
"""

from __future__ import annotations

from llm_slice_core import SliceError


class FalconModelError(SliceError):
    """A Falcon config or checkpoint this package cannot run, with the reason.

    Raised for configs that name a variant transformers' Falcon does not run (the message names
    the field), checkpoint keys it does not know, and directories holding another architecture.
    """
