"""A part of a Llama-family model: begin (embeddings), a range of decoder layers, end (norm + head).

Module names follow the Hugging Face checkpoint (``layers.3.self_attn.q_proj.weight``), so the
state dict keys of a part are the sepweight keys. Positions are never kept in the module: they are
derived on every call from the padding mask and the cache the caller passes in (llm_slice_core).
Linear layers that share an input are grouped (``Linears``): one product each once packed, on
llm_slice_core's decode kernel for decode steps, else cut into one block per CPU thread on
one-row steps (``splits``), on oneDNN for several rows; see llm_slice_core.packing, .kernel and
.products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_sepweight import PartSpec
from llm_slice_core import (
    CacheError,
    InputError,
    KVCache,
    LayerKV,
    Linears,
    ModelPart,
    Slots,
    additive_mask,
    allowed_keys,
    attend,
)

from . import rope
from .config import LlamaConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the mean square taken in float32 (as transformers does)."""

    def __init__(self, dim: int, eps: float, **factory) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        # 0-d CPU tensors divide and add without wrapping a Python number on every call (~3% of
        # a SmolLM2 decode step on a CPU); they combine with tensors on any device.
        self._count = torch.tensor(float(dim), device="cpu")
        self._eps = torch.tensor(float(eps), device="cpu")

    @property
    def eps(self) -> float:
        """The epsilon added to the mean square (fixed at construction)."""
        return float(self._eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalised over its last dimension and scaled, in ``x``'s dtype."""
        x32 = x if x.dtype == torch.float32 else x.float()
        # sum / n is exactly torch.mean; in place and without F.rms_norm, whose CPU kernel
        # makes extra copies (a third of its time on one decode token).
        mean_square = (x32 * x32).sum(-1, keepdim=True).div_(self._count)
        normed = x32 * mean_square.add_(self._eps).rsqrt_()
        return self.weight * (normed if x.dtype == torch.float32 else normed.to(x.dtype))


@dataclass
class Step:
    """What every layer of one forward call shares."""

    cos: torch.Tensor  # [B, T, 1, head_dim]
    sin: torch.Tensor  # [B, T, 1, head_dim], first half negated (see rope.cos_sin)
    mask: torch.Tensor  # [B, 1, T, S] additive: 0 = may attend, -inf = masked
    slots: Slots  # cache slots and positions of the new tokens
    splits: int = 1  # blocks each product is cut into, one per CPU thread (llm_slice_core)


class Attention(nn.Module):
    """Multi-head attention with RoPE; MHA, GQA and MQA differ only in num_key_value_heads."""

    def __init__(self, config: LlamaConfig, **factory) -> None:
        super().__init__()
        hidden, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.head_dim = hd
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * hd, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * hd, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * hd, bias=bias, **factory)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, hidden, bias=bias, **factory)
        self.qkv = Linears(self.q_proj, self.k_proj, self.v_proj)
        self.out = Linears(self.o_proj, transpose=False)

    def forward(
        self, h: torch.Tensor, x: torch.Tensor, shape: tuple[int, int], step: Step, kv: LayerKV
    ) -> torch.Tensor:
        """``h + attention(x)`` for the residual ``h`` and normed ``x``, both ``[B*T, hidden]``."""
        B, T = shape
        hd, heads, kv_heads = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(x, step.splits)  # [B*T, (heads + 2 kv_heads) hd]
        # RoPE rotates q and k together, in the [B, T, heads, hd] layout the projection gives.
        qk = qkv[:, : (heads + kv_heads) * hd].view(B, T, heads + kv_heads, hd)
        qk = rope.apply_rope(qk, step.cos, step.sin)
        q = qk[:, :, :heads].transpose(1, 2)  # [B, heads, T, hd]
        k = qk[:, :, heads:].transpose(1, 2)  # [B, kv_heads, T, hd]
        v = qkv[:, (heads + kv_heads) * hd :].view(B, T, kv_heads, hd).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(step.slots.start, k, v)
        # SDPA with enable_gqa (each key/value head shared by its query heads: repeat_kv without
        # a copy), or for one new token and many query heads per group one product per group
        out = attend(q, k, v, step.mask)
        return self.out(out.transpose(1, 2).reshape(B * T, heads * hd), step.splits, residual=h)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, **factory) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden, inner, bias=bias, **factory)
        self.down_proj = nn.Linear(inner, hidden, bias=bias, **factory)
        self.gate_up = Linears(self.gate_proj, self.up_proj)
        self.down = Linears(self.down_proj, transpose=False)

    def forward(self, h: torch.Tensor, x: torch.Tensor, splits: int = 1) -> torch.Tensor:
        """``h + mlp(x)`` for the residual ``h`` and normed ``x``, both ``[N, hidden]``."""
        both = self.gate_up(x, splits)
        inner = both.shape[-1] // 2
        gate, up = both[:, :inner], both[:, inner:]  # (slicing is cheaper than chunk)
        return self.down(F.silu(gate).mul_(up), splits, residual=h)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: LlamaConfig, **factory) -> None:
        super().__init__()
        self.self_attn = Attention(config, **factory)
        self.mlp = MLP(config, **factory)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)

    def forward(self, h: torch.Tensor, step: Step, kv: LayerKV | None) -> torch.Tensor:
        """The residual stream ``h [B, T, hidden]`` after this layer; appends k/v to ``kv``."""
        B, T, H = h.shape
        h = h.reshape(B * T, H)  # the residual stream as [N, hidden]: every product is 2-d
        h = self.self_attn(h, self.input_layernorm(h), (B, T), step, kv)
        h = self.mlp(h, self.post_attention_layernorm(h), step.splits)
        return h.view(B, T, H)


class LlamaPart(ModelPart):
    """Begin, a range of decoder layers and/or end of a Llama-family model, as one module.

    ``LlamaPart(config, "b 0-8")`` holds the embeddings and layers 0..7 in ``layers[0..7]``;
    ``"8-16"`` holds layers 8..15 in local slots ``layers[0..7]``; ``"16-30 e"`` adds the final
    norm and the head. Weights are uninitialised (use ``load_part`` or ``load_state_dict``).
    """

    def __init__(
        self,
        config: LlamaConfig,
        spec: PartSpec | str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config, self.spec = config, PartSpec.parse(spec).resolve(config.num_hidden_layers)
        self.vocab_size, self.hidden_size = config.vocab_size, config.hidden_size
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        factory = {"device": device, "dtype": dtype}
        if self.spec.begin:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, **factory) for _ in self.spec.layers)
        if self.spec.end:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
            self.head = Linears(self.lm_head)
        self.register_buffer("inv_freq", rope.inv_freq(config).to(device), persistent=False)

    embedding = property(lambda self: self.embed_tokens, doc="The token embedding (begin).")
    final_norm = property(lambda self: self.norm, doc="The final norm (end).")

    def tie_weights(self) -> None:
        """Share one tensor between embeddings and head when the config ties them and both exist."""
        if self.config.tie_word_embeddings and self.spec.begin and self.spec.end:
            self.lm_head.weight = self.embed_tokens.weight

    def assigned_to(self, device: torch.device) -> None:
        """Tie the head (when the config says so) and compute the RoPE frequencies on ``device``."""
        self.tie_weights()
        self.inv_freq = rope.inv_freq(self.config).to(device)

    def check_max_len(self, max_len: int) -> None:
        """Refuse a cache longer than a sliding window (sliding-window attention is not run)."""
        window = self.config.sliding_window
        if window is not None and window < max_len:
            raise CacheError(
                f"max_len {max_len} exceeds the model's sliding_window {window}; sliding-window "
                f"attention is not implemented, so ask for max_len <= {window}"
            )

    def prepare(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, Step]:
        """The first layer's input and the :class:`Step` every layer of this call shares."""
        slots, splits = self.start_step(x, mask, cache)
        window = self.config.sliding_window
        if cache is None and window is not None and slots.steps > window:
            raise InputError(
                f"x has {slots.steps} positions, more than the sliding_window {window}"
            )
        h = self.embed_tokens(x) if self.spec.begin else x.to(self.dtype)
        cos, sin = rope.cos_sin(self.inv_freq, slots.positions, h.dtype)
        mask = additive_mask(allowed_keys(slots), h.dtype)
        return h, Step(cos, sin, mask, slots, splits)

    def complete(self, h: torch.Tensor, step: Step, cache: KVCache | None = None) -> torch.Tensor:
        """Commit the call to the cache; float32 logits ``[B, T, vocab]`` with end, else ``h``."""
        self.end_step(step.slots, cache)
        if not self.spec.end:
            return h
        B, T, H = h.shape
        return self.head(self.norm(h).view(B * T, H), step.splits).view(B, T, -1).float()
