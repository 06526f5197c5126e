"""The one exception class of llm_falcon_model."""

from __future__ import annotations


class FalconModelError(ValueError):
    """A Falcon config, part, input or cache that this package cannot run, with the reason.

    Raised for configs that name a variant transformers' Falcon does not run (the message names the
    field), token ids outside the vocabulary, hidden states of the wrong width, a batch larger than
    its cache, a sequence longer than the cache, and a malformed padding mask.
    """
