"""Falcon as slices: begin (token embeddings), a range of decoder layers, end (final norm, head).

Module names follow the Hugging Face checkpoint, so the state-dict keys of a part are the
checkpoint's keys with ``transformer.h.N.`` replaced by ``layers.<slot>.``:
``word_embeddings.weight``, ``layers.0.self_attention.query_key_value.weight``, ``ln_f.weight``,
``lm_head.weight``.

One forward call takes ``T`` new tokens per row (ids for a part with begin, hidden states
otherwise), a ``[B, T]`` padding mask and optionally a :class:`KVCache`; positions come from the
mask and the cache, never from the slot index, so a left-padded row computes exactly what it
would alone. Numerics follow ``transformers``' ``FalconForCausalLM`` (SDPA attention) op for op
where rounding could differ: un-fused ``x @ W.T`` then ``+ b``, rotary tables cast to the hidden
dtype, ALiBi slopes times positions in bfloat16. Each linear layer is computed through an
llm_slice_core ``Linears`` (packed for fast CPU reads; decode steps on llm_slice_core's
decode kernel, else one row cut into one block per thread: ``splits``, several rows on oneDNN),
attention through llm_slice_core's ``attend``.
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
from llm_slice_core import KVCache, LayerKV, Linears, ModelPart, Slots, allowed_keys, attend

from .config import FalconConfig

# ---------------------------------------------------------------------------------------------
# Positions: rotary tables or ALiBi biases, and which keys each new token may see.


@dataclass(frozen=True)
class Step:
    """What every layer of one forward call shares: slots, position encoding, mask, splits.

    ``mask`` is None (no padding, one new token or plain causal: ``is_causal``), a bool
    ``[B|1, 1, T, L]`` (True = may attend), or, with ALiBi, the additive float bias
    ``[B, heads, T, L]`` with masked keys at the dtype's minimum, as transformers builds it.
    """

    slots: Slots
    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    is_causal: bool
    splits: int = 1  # blocks each product is cut into, one per CPU thread (llm_slice_core)


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


def make_step(config: FalconConfig, slots: Slots, dtype: torch.dtype, splits: int) -> Step:
    """The position encoding and mask of one forward call, built once for all its layers."""
    if config.alibi:
        bias = alibi_bias(config, slots.key_positions(), dtype)
        mask = torch.where(allowed_keys(slots), bias, torch.finfo(dtype).min)
        return Step(slots, None, mask, False, splits)
    rope = rope_tables(config, slots.positions, dtype)
    if slots.padded:
        return Step(slots, rope, allowed_keys(slots), False, splits)
    if slots.steps == 1:
        return Step(slots, rope, None, False, splits)
    if slots.start == 0:
        return Step(slots, rope, None, True, splits)
    return Step(slots, rope, allowed_keys(slots)[:1], False, splits)


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


def linear(
    in_features: int, out_features: int, bias: bool, transpose: bool = True
) -> tuple[nn.Linear, Linears]:
    """A linear layer and its product ``x @ W.T`` then ``+ b`` (two ops, as Falcon was trained:
    one more rounding in bf16), stored transposed when packed unless ``transpose`` is False."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    return layer, Linears(layer, bias_after=True, transpose=transpose)


def flat(product: Linears, x: torch.Tensor, splits: int) -> torch.Tensor:
    """``product`` applied to ``x [B, T, in]`` as one 2-d product: ``[B, T, out]``."""
    batch, steps, width = x.shape
    return product(x.reshape(batch * steps, width), splits).view(batch, steps, -1)


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
        self.query_key_value, self.qkv = linear(hidden, fused_heads * config.head_dim, config.bias)
        self.dense, self.out = linear(hidden, hidden, config.bias, transpose=False)

    def forward(self, x: torch.Tensor, step: Step, cache: LayerKV | None) -> torch.Tensor:
        """Attention output ``[B, T, hidden]`` for ``x [B, T, hidden]``; k, v go into ``cache``."""
        fused = flat(self.qkv, x, step.splits)
        q, k, v = (t.transpose(1, 2) for t in self.split(fused, self.config))
        if step.rope is not None:
            q, k = apply_rope(q, *step.rope), apply_rope(k, *step.rope)
        if cache is not None:
            k, v = cache.update(step.slots.start, k, v)  # [B, kv_heads, L, d], never expanded
        # SDPA (key/value heads shared, never expanded), or for one new token and many query
        # heads per key/value head (7B: 71) one product per key/value head (llm_slice_core)
        y = attend(q, k, v, step.mask, step.is_causal)  # [B, heads, T, d]
        return flat(self.out, y.transpose(1, 2).flatten(2), step.splits)


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
        hidden, inner, bias = config.hidden_size, config.ffn_hidden_size, config.bias
        self.dense_h_to_4h, self.up = linear(hidden, inner, bias)
        self.dense_4h_to_h, self.down = linear(inner, hidden, bias, transpose=False)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor, splits: int = 1) -> torch.Tensor:
        """``dense_4h_to_h(act(dense_h_to_4h(x)))``."""
        return flat(self.down, self.act(flat(self.up, x, splits)), splits)


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

    def forward(self, x: torch.Tensor, step: Step, cache: LayerKV | None) -> torch.Tensor:
        """``x + mlp(norm(x)) + attention(norm(x))`` with one shared norm."""
        h = self.input_layernorm(x)
        return x + (self.mlp(h, step.splits) + self.self_attention(h, step, cache))


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

    def forward(self, x: torch.Tensor, step: Step, cache: LayerKV | None) -> torch.Tensor:
        """``x + mlp(ln_mlp(x)) + attention(ln_attn(x))``."""
        attention = self.self_attention(self.ln_attn(x), step, cache)
        return x + (self.mlp(self.ln_mlp(x), step.splits) + attention)


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

    def forward(self, x: torch.Tensor, step: Step, cache: LayerKV | None) -> torch.Tensor:
        """``x += attention(norm(x))``, then ``x += mlp(norm(x))``."""
        x = x + self.self_attention(self.input_layernorm(x), step, cache)
        return x + self.mlp(self.post_attention_layernorm(x), step.splits)


BLOCKS = {
    "parallel": ParallelBlock,
    "parallel_two_norms": TwoNormParallelBlock,
    "sequential": SequentialBlock,
}


# ---------------------------------------------------------------------------------------------
# The part.


class FalconPart(ModelPart):
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
        self.vocab_size, self.hidden_size = config.vocab_size, config.hidden_size
        self.kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        with torch.device(device) if device is not None else nullcontext():
            if self.spec.begin:
                self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
            block = BLOCKS[config.block]
            self.layers = nn.ModuleList(block(config) for _ in self.spec.layers)
            if self.spec.end:
                self.ln_f = layer_norm(config)
                self.lm_head, self.head = linear(config.hidden_size, config.vocab_size, False)
        if dtype is not None:
            self.to(dtype)

    embedding = property(lambda self: self.word_embeddings, doc="The token embedding (begin).")
    final_norm = property(lambda self: self.ln_f, doc="The final norm (end).")

    def assigned_to(self, device: torch.device) -> None:
        """With tied embeddings, a part holding begin and end uses the embedding as its head."""
        if self.config.tie_word_embeddings and self.spec.begin and self.spec.end:
            self.lm_head.weight = self.word_embeddings.weight  # one copy in memory, as trained

    def prepare(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, Step]:
        """The first layer's input and the :class:`Step` every layer of this call shares."""
        slots, splits = self.start_step(x, mask, cache)
        h = self.word_embeddings(x) if self.spec.begin else x.to(self.dtype)
        return h, make_step(self.config, slots, h.dtype, splits)

    def complete(self, h: torch.Tensor, step: Step, cache: KVCache | None = None) -> torch.Tensor:
        """Commit the call to the cache; float32 logits ``[B, T, vocab]`` with end, else ``h``."""
        self.end_step(step.slots, cache)
        if self.spec.end:
            h = flat(self.head, self.ln_f(h), step.splits).float()
        return h
