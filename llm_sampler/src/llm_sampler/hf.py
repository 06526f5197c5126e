"""A forward function over a Hugging Face causal LM, duck-typed (no import of transformers)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import SamplerError


class HFCausalLM:
    """``forward(input_ids, mask) -> logits`` over a ``transformers`` causal LM object.

    With ``cached=True`` (the default) it keeps ``past_key_values`` and the attention mask of
    everything it has seen, so it expects the prompt first and then only new tokens — exactly what
    ``generate(..., cached=True)`` passes. Use one instance per generation, or call
    :meth:`reset` in between. With ``cached=False`` every call is independent (for
    ``cached=False`` generation and for scoring).

    Position ids are derived from the mask, as ``transformers``' ``generate`` does, so left-padded
    rows get the same positions as when run alone.
    """

    def __init__(self, model: Any, *, cached: bool = True) -> None:
        """Wrap ``model``: anything called as ``model(input_ids=..., attention_mask=...,
        position_ids=..., past_key_values=..., use_cache=...)`` returning ``.logits``."""
        if not callable(model):
            raise SamplerError(f"model must be a callable causal LM, got {type(model).__name__}")
        self.model = model
        self.cached = cached
        self._past: Any = None
        self._mask: torch.Tensor | None = None
        self._padded = False

    def reset(self) -> None:
        """Forget the KV cache, so the next call starts a new sequence."""
        self._past = None
        self._mask = None
        self._padded = False

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on ``input_ids[B, T]`` (``mask[B, T]`` True on real tokens)."""
        device = getattr(self.model, "device", input_ids.device)
        ids = input_ids.to(device)
        new_mask = (
            torch.ones_like(ids) if mask is None else mask.to(device=device, dtype=torch.long)
        )
        if self._mask is not None and self._mask.shape[0] != ids.shape[0]:
            raise SamplerError(
                f"this HFCausalLM holds a cache for batch size {self._mask.shape[0]} but got "
                f"{ids.shape[0]} rows; call reset() before starting a new sequence"
            )
        full_mask = new_mask if self._mask is None else torch.cat([self._mask, new_mask], dim=1)
        positions = (full_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        # Without padding the model needs no mask, and building one costs it time every step.
        padded = self._padded or not bool(new_mask.all())
        output = self.model(
            input_ids=ids,
            attention_mask=full_mask if padded else None,
            position_ids=positions,
            past_key_values=self._past if self.cached else None,
            use_cache=self.cached,
        )
        if self.cached:
            self._past = output.past_key_values
            self._mask = full_mask
            self._padded = padded
        return output.logits
