"""The meanings every model slice shares for what it refuses; each family's error subclasses one.

``except SliceError`` catches whatever a part of any family refuses; the subclasses say which
argument was wrong, the same in every family: :class:`InputError` (``x`` or ``mask``),
:class:`CacheError` (the ``cache`` or its size), :class:`WeightsError` (tensors that do not fit a
part). A bad part spec is ``llm_sepweight.PartSpecError`` (the model packages raise it).
"""

from __future__ import annotations


class SliceError(ValueError):
    """A model slice cannot run what it was given (the message names the argument)."""


class InputError(SliceError):
    """``x`` or ``mask`` of a forward call is malformed (shape, dtype, device, values)."""


class CacheError(SliceError):
    """A cache that does not fit: another part's, too few rows, too short, or already joined."""


class WeightsError(SliceError):
    """Tensors that do not fit a part: missing or unexpected keys, wrong shapes or dtypes."""
