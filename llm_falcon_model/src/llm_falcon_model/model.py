"""Falcon as slices: begin (token embeddings), a range of decoder layers, end (final norm, head).

Module names follow the Hugging Face checkpoint, so the state-dict keys of a part are the
checkpoint's keys with ``transformer.h.N.`` replaced by ``layers.<slot>.``:
``word_embeddings.weight``, ``layers.0.self_attention.query_key_value.weight``, ``ln_f.weight``,
``lm_head.weight``.

One forward call takes ``T`` new tokens per row (ids for a part with begin, hidden states
otherwise), a ``[B, T]`` padding mask and optionally a :class:`KVCache`; positions come from the
mask and the cache, never from the slot index, so a left-padded row computes exactly what it
would alone. Numerics follow ``transformers``' ``FalconForCausalLM`` (SDPA attention) op for op
where rounding could differ: un-fused ``x @ W.T + b``, rotary tables cast to the hidden dtype,
ALiBi slopes times positions in bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llm_sepweight import PartSpec

from .cache import KVCache, LayerCache, Step, uncached_step
from .config import FalconConfig
from .errors import FalconModelError

# ---------------------------------------------------------------------------------------------
# Positions: rotary tables or ALiBi biases, and which keys each new token may see.


@dataclass(frozen=True)
class AttentionInputs:
    """What every layer of one forward call shares: the slot offset and the position encoding.

    ``mask`` is None (no padding, one new token), a bool ``[B|1, 1, T, L]`` (True = may attend),
    or, with ALiBi, the additive float bias ``[B, heads, T, L]`` with masked keys at the dtype's
    minimum, as transformers builds it.
    """

    start: int
    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    is_causal: bool


def rope_tables(
    config: FalconConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[B, T, head_dim]`` for integer ``positions`` ``[B, T]``."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents) / config.rope_linear_factor
    freqs = positions[..., None].float() * inv_freq  # [B, T, dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[B, heads, T, d]``) by the tables; the halves-of-the-head convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """Per-head ALiBi slopes (float32): a geometric series, interleaved when not a power of 2."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), device=device)
    slopes = base ** torch.arange(1, 1 + closest, device=device, dtype=torch.int32)
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), device=device)
        extra = min(closest, num_heads - closest)
        powers = torch.arange(1, 1 + 2 * extra, 2, device=device, dtype=torch.int32)
        slopes = torch.cat([slopes, extra_base**powers])
    return slopes


def alibi_bias(
    config: FalconConfig, key_positions: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """ALiBi bias ``[B, heads, 1, L]``, already divided by ``sqrt(head_dim)`` like transformers.

    Each key gets ``slope x position`` computed in bfloat16 (as transformers does); the query's
    own position drops out of the softmax, so only the key's position matters.
    """
    slopes = alibi_slopes(config.num_heads, key_positions.device).bfloat16()
    bias = slopes[None, :, None] * key_positions[:, None, :]  # bf16 [B, heads, L]
    return (bias.to(dtype) / math.sqrt(config.head_dim))[:, :, None, :]


def allowed_keys(step: Step, steps: int) -> torch.Tensor:
    """``[B, 1, T, L]``: a new token sees the real keys at or before its slot.

    A padding token also sees itself, so that no row of the softmax is empty.
    """
    device = step.key_real.device
    query_slot = step.start + torch.arange(steps, device=device)[:, None]
    key_slot = torch.arange(step.key_real.shape[1], device=device)[None, :]
    allowed = (key_slot <= query_slot) & step.key_real[:, None, :]
    return (allowed | (key_slot == query_slot))[:, None]


def attention_inputs(
    config: FalconConfig, step: Step, steps: int, dtype: torch.dtype
) -> AttentionInputs:
    """Build the position encoding and mask of one forward call, once for all its layers."""
    if config.alibi:
        bias = alibi_bias(config, step.key_positions, dtype)
        mask = torch.where(allowed_keys(step, steps), bias, torch.finfo(dtype).min)
        return AttentionInputs(step.start, None, mask, is_causal=False)
    rope = rope_tables(config, step.positions, dtype)
    if step.padded:
        return AttentionInputs(step.start, rope, allowed_keys(step, steps), is_causal=False)
    if steps == 1:
        return AttentionInputs(step.start, rope, None, is_causal=False)
    if step.start == 0:
        return AttentionInputs(step.start, rope, None, is_causal=True)
    return AttentionInputs(step.start, rope, allowed_keys(step, steps)[:1], is_causal=False)


# ---------------------------------------------------------------------------------------------
# The fused query/key/value layouts.


def split_grouped(fused: torch.Tensor, config: FalconConfig) -> tuple[torch.Tensor, ...]:
    """New decoder architecture: per KV group ``[q ... q, k, v]`` -> ``q, k, v``."""
    batch, steps, _ = fused.shape
    per_group = config.num_heads // config.num_kv_heads
    groups = fused.view(batch, steps, config.num_kv_heads, per_group + 2, config.head_dim)
    q = groups[:, :, :, :per_group].reshape(batch, steps, config.num_heads, config.head_dim)
    return q, groups[:, :, :, per_group], groups[:, :, :, per_group + 1]


def split_multi_query(fused: torch.Tensor, config: FalconConfig) -> tuple[torch.Tensor, ...]:
    """Multi-query: ``[q_0 ... q_{h-1}, k, v]`` -> ``q, k, v`` (one KV head)."""
    batch, steps, _ = fused.shape
    heads = fused.view(batch, steps, config.num_heads + 2, config.head_dim)
    return heads.split([config.num_heads, 1, 1], dim=2)


def split_per_head(fused: torch.Tensor, config: FalconConfig) -> tuple[torch.Tensor, ...]:
    """Plain multi-head: ``[q, k, v]`` per head -> ``q, k, v``."""
    batch, steps, _ = fused.shape
    heads = fused.view(batch, steps, config.num_heads, 3, config.head_dim)
    return heads[..., 0, :], heads[..., 1, :], heads[..., 2, :]


QKV_SPLITS = {
    "grouped": split_grouped,
    "multi_query": split_multi_query,
    "per_head": split_per_head,
}


# ---------------------------------------------------------------------------------------------
# Layers.


class Linear(nn.Linear):
    """``x @ W.T`` then ``+ b`` as two ops, as Falcon was trained (one more rounding in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T (+ bias)``, the bias added after the product as transformers does."""
        y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class SelfAttention(nn.Module):
    """Fused QKV projection, rotary or ALiBi positions, attention over the cached heads, dense.

    Query heads share key/value heads; only the KV heads are computed and cached::

        multi-head (Falcon-RW)      grouped (40B, 180B, 11B)      multi-query (7B)
        q0  q1  q2  q3              q0  q1  q2  q3                q0  q1  q2  q3
        |   |   |   |                \\  /    \\  /                   \\   \\  /   /
        k0  k1  k2  k3                k0      k1                         k0
        stored [q k v] per head     stored [q q k v] per group    stored [q q q q k v]
    """

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        fused_heads = config.num_heads + 2 * config.num_kv_heads
        hidden = config.hidden_size
        self.config = config
        self.split = QKV_SPLITS[config.qkv_layout]
        self.query_key_value = Linear(hidden, fused_heads * config.head_dim, bias=config.bias)
        self.dense = Linear(hidden, hidden, bias=config.bias)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, cache: LayerCache | None
    ) -> torch.Tensor:
        """Attention output ``[B, T, hidden]`` for ``x [B, T, hidden]``; k, v go into ``cache``."""
        batch, steps, hidden = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.split(self.query_key_value(x), self.config))
        if inputs.rope is not None:
            q, k = apply_rope(q, *inputs.rope), apply_rope(k, *inputs.rope)
        if cache is not None:
            k, v = cache.update(inputs.start, k, v)  # [B, kv_heads, L, d], never expanded
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=inputs.mask,
            is_causal=inputs.is_causal,
            enable_gqa=self.config.num_kv_heads != self.config.num_heads,
        )  # [B, heads, T, d]
        return self.dense(y.transpose(1, 2).reshape(batch, steps, hidden))


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation named by a Falcon config (the tanh GELUs are one function in torch)."""
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return partial(F.gelu, approximate="tanh")
    return F.relu if name == "relu" else F.silu


class MLP(nn.Module):
    """``dense_4h_to_h(act(dense_h_to_4h(x)))``."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.dense_4h_to_h = Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``dense_4h_to_h(act(dense_h_to_4h(x)))``."""
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


def layer_norm(config: FalconConfig) -> nn.LayerNorm:
    """A LayerNorm over the hidden size with the config's epsilon."""
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class ParallelBlock(nn.Module):
    """Falcon-7B and Falcon2-11B: one norm feeds attention and MLP side by side::

    x --+--> input_layernorm --+--> self_attention --+
        |                      +--> mlp ------------(+)
        +-------------------------------------------(+)--> out
    """

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.input_layernorm = layer_norm(config)
        self.self_attention = SelfAttention(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, cache: LayerCache | None
    ) -> torch.Tensor:
        """``x + mlp(norm(x)) + attention(norm(x))`` with one shared norm."""
        h = self.input_layernorm(x)
        return x + (self.mlp(h) + self.self_attention(h, inputs, cache))


class TwoNormParallelBlock(nn.Module):
    """Falcon-40B and 180B: attention and MLP side by side, each behind its own norm::

    x --+--> ln_attn --> self_attention --+
        +--> ln_mlp  --> mlp -------------(+)
        +---------------------------------(+)--> out
    """

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.ln_attn = layer_norm(config)
        self.ln_mlp = layer_norm(config)
        self.self_attention = SelfAttention(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, cache: LayerCache | None
    ) -> torch.Tensor:
        """``x + mlp(ln_mlp(x)) + attention(ln_attn(x))``."""
        attention = self.self_attention(self.ln_attn(x), inputs, cache)
        return x + (self.mlp(self.ln_mlp(x)) + attention)


class SequentialBlock(nn.Module):
    """Falcon-RW (``parallel_attn=False``): the classic pre-norm block, attention then MLP::

    x --+--> input_layernorm --> self_attention ----+
        +------------------------------------------(+)--> h
    h --+--> post_attention_layernorm --> mlp -------+
        +------------------------------------------(+)--> out
    """

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.input_layernorm = layer_norm(config)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = layer_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs, cache: LayerCache | None
    ) -> torch.Tensor:
        """``x += attention(norm(x))``, then ``x += mlp(norm(x))``."""
        x = x + self.self_attention(self.input_layernorm(x), inputs, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


BLOCKS = {
    "parallel": ParallelBlock,
    "parallel_two_norms": TwoNormParallelBlock,
    "sequential": SequentialBlock,
}


# ---------------------------------------------------------------------------------------------
# The part.


class FalconPart(nn.Module):
    """A slice of Falcon: begin (``b``), layers ``a-b`` and/or end (``e``) of one model.

    ``layers[i]`` is the part's local slot ``i`` (global layer ``spec.layers.start + i``).
    Input: ids ``[B, T]`` with begin, hidden ``[B, T, hidden]`` otherwise; output: float32
    logits ``[B, T, vocab]`` with end, hidden ``[B, T, hidden]`` otherwise.
    """

    def __init__(
        self,
        config: FalconConfig,
        spec: str | PartSpec = "f",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.spec = PartSpec.parse(spec).resolve(config.num_layers)
        with torch.device(device) if device is not None else nullcontext():
            if self.spec.begin:
                self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
            block = BLOCKS[config.block]
            self.layers = nn.ModuleList(block(config) for _ in self.spec.layers)
            if self.spec.end:
                self.ln_f = layer_norm(config)
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if dtype is not None:
            self.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the part's weights (and of its hidden states and cache)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device of the part's weights."""
        return next(self.parameters()).device

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """Empty K/V buffers for this part's layers, at the KV-head count, on its device/dtype."""
        config = self.config
        return KVCache(
            len(self.layers),
            batch_size,
            max_len,
            config.num_kv_heads,
            config.head_dim,
            device=self.device,
            dtype=self.dtype,
        )

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the part on ``T`` new tokens per row; with a cache, append them to it.

        ``mask`` ``[B, T]`` (bool or 0/1 ints) marks real tokens (1) and left padding (0);
        None means all real. The same as :meth:`prepare`, every layer, :meth:`complete`.
        """
        h, inputs, step = self.prepare(x, mask, cache)
        for slot, layer in enumerate(self.layers):
            h = layer(h, inputs, None if cache is None else cache.layers[slot])
        return self.complete(h, step, cache)

    def prepare(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, AttentionInputs, Step]:
        """Check the inputs; return the first layer's input, the shared attention inputs, the step.

        For a driver that runs the layers itself (e.g. streaming their weights):
        ``h = part.layers[i](h, inputs, cache.layers[i])`` for each slot, then :meth:`complete`.
        """
        batch, steps = self._check_input(x)
        mask = check_mask(mask, batch, steps, x.device)
        if cache is not None:
            self._check_cache(cache)
        step = uncached_step(mask) if cache is None else cache.plan(mask)
        h = self.word_embeddings(x) if self.spec.begin else x.to(self.dtype)
        return h, attention_inputs(self.config, step, steps, h.dtype), step

    def complete(self, h: torch.Tensor, step: Step, cache: KVCache | None = None) -> torch.Tensor:
        """Commit the step to the cache and apply the end (final norm, float32 logits), if held."""
        if cache is not None:
            cache.advance(step)
        if self.spec.end:
            h = self.lm_head(self.ln_f(h)).float()
        return h

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise FalconModelError(f"expected a tensor, got {type(x).__name__}")
        if self.spec.begin:
            if x.ndim != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
                raise FalconModelError(
                    "a part with begin takes token ids LongTensor[B, T], "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            vocab = self.config.vocab_size
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
                raise FalconModelError(
                    f"token ids must be in [0, {vocab}), got {int(x.min())}..{int(x.max())}"
                )
        elif x.ndim != 3 or x.shape[-1] != self.config.hidden_size or not x.dtype.is_floating_point:
            raise FalconModelError(
                f"a part without begin takes float hidden states [B, T, {self.config.hidden_size}],"
                f" got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise FalconModelError(f"empty input of shape {tuple(x.shape)}")
        return x.shape[0], x.shape[1]

    def _check_cache(self, cache: KVCache) -> None:
        if not isinstance(cache, KVCache) or len(cache.layers) != len(self.layers):
            raise FalconModelError(
                f"this cache was not made by this part (use part.new_cache); the part has "
                f"{len(self.layers)} layers"
            )


def check_mask(
    mask: torch.Tensor | None, batch: int, steps: int, device: torch.device
) -> torch.Tensor:
    """The padding mask as bool ``[B, T]``; raises :class:`FalconModelError` when malformed."""
    if mask is None:
        return torch.ones(batch, steps, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, steps):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise FalconModelError(f"mask must be a [B, T] = [{batch}, {steps}] tensor, got {shape}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise FalconModelError(f"mask must be bool or integer 0/1, got {mask.dtype}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise FalconModelError("mask values must be 0 (padding) or 1 (real token)")
        mask = mask != 0
    return mask.to(device)
