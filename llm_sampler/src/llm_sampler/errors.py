"""The one exception type llm_sampler raises for bad input."""

from __future__ import annotations


class SamplerError(ValueError):
    """Raised when a sampling setting, a prompt, or a forward function's output is invalid.

    It subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
    """
