"""Rotary position embeddings: inverse frequencies (default, linear, llama3) and rotation."""

from __future__ import annotations

import math

import torch

from .config import LlamaConfig


def inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Float32 inverse frequencies [head_dim // 2], computed on the CPU as transformers does."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return freq
    if scaling.rope_type == "linear":
        return freq / scaling.factor
    return _llama3(
        freq,
        scaling.factor,
        scaling.low_freq_factor,
        scaling.high_freq_factor,
        scaling.original_max_position_embeddings,
    )


def _llama3(
    freq: torch.Tensor, factor: float, low: float, high: float, old_len: int
) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, the band between blended."""
    wavelen = 2 * math.pi / freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, blended, scaled)


def cos_sin(
    freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """cos and signed sin [B, T, 1, head_dim] for integer positions [B, T], computed in float32.

    The sin's first half is negated so that ``apply_rope`` needs one roll instead of a
    slice-negate-concatenate (negation is exact, so the result equals transformers').
    """
    angles = positions[..., None].float() * freq  # [B, T, head_dim // 2]
    cos, sin = angles.cos(), angles.sin()
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, head_dim] (the "rotate half" layout of Hugging Face weights):
    x * cos + cat(-x2, x1) * sin, written as x * cos + roll(x, half) * cat(-sin, sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
