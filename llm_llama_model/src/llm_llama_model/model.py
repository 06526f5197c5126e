"""A part of a Llama-family model: begin (embeddings), a range of decoder layers, end (norm + head).

Module names follow the Hugging Face checkpoint (``layers.3.self_attn.q_proj.weight``), so the
state dict keys of a part are the sepweight keys. Positions are never kept in the module: they are
derived on every call from the padding mask and the cache the caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_sepweight import PartSpec

from . import rope
from .cache import KVCache, LayerKV
from .config import LlamaConfig
from .errors import LlamaModelError


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the mean square taken in float32 (as transformers does)."""

    def __init__(self, dim: int, eps: float, **factory) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        # 0-d tensors divide and add without wrapping a Python number on every call (a float
        # costs a conversion per call, ~3% of a SmolLM2 decode step on a CPU; CPU 0-d tensors
        # combine with tensors on any device)
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
        # makes extra copies: this is a third of its time on one decode token.
        mean_square = (x32 * x32).sum(-1, keepdim=True).div_(self._count)
        normed = x32 * mean_square.add_(self._eps).rsqrt_()
        return self.weight * (normed if x.dtype == torch.float32 else normed.to(x.dtype))


@dataclass
class Step:
    """What every layer of one forward call shares: RoPE angles, mask, first cache slot."""

    cos: torch.Tensor  # [B, T, 1, head_dim]
    sin: torch.Tensor  # [B, T, 1, head_dim], first half negated (see rope.cos_sin)
    mask: torch.Tensor  # [B, 1, T, S] additive float: 0 = may attend, -inf = masked
    start: int  # cache slot of the first new position (0 without a cache)
    splits: int = 1  # blocks each matrix product is cut into, one per thread (see _product)


# A CPU matrix product with this many input rows or fewer (decoding) is cut into one block per
# thread: torch's matrix-vector product runs on a single thread, a batched product of the blocks
# on all of them. With more rows (prefill) the product itself is already multi-threaded.
SPLIT_MAX_ROWS = 16


@torch.compiler.disable
def thread_splits(rows: int, device: torch.device, dtype: torch.dtype) -> int:
    """How many blocks to cut each matrix product of ``rows`` input rows into (see _product)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64) or rows > SPLIT_MAX_ROWS:
        return 1  # (half-precision partial sums would round once more than one product does)
    return torch.get_num_threads()


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most``."""
    while n % at_most:
        at_most -= 1
    return at_most


def _product(x: torch.Tensor, w: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """``x [N, K] @ w [K, M]``.

    With ``splits > 1`` the product is one batched product of blocks of ``w``, which torch runs
    on ``splits`` threads: a wide ``w`` (the head) is cut into column blocks, any other into
    row blocks whose partial products are summed (the same sum in another order: float32
    rounding, ~1e-7 relative). Both cuts are views (splitting one dimension always is), so
    nothing is copied but the small output.
    """
    if splits > 1 and torch.compiler.is_compiling():
        # inductor would lower the batched product into its own loop, slower than the library's
        # one-thread product; as a custom op the blocks stay one opaque call.
        return torch.ops.llm_llama_model.product_in_blocks(x, w, splits)
    K, M = w.shape
    if splits > 1 and M >= 8 * K:
        parts = _divisor(M, splits)
        blocks = w.view(K, parts, M // parts).transpose(0, 1)  # [parts, K, M / parts]
        out = torch.bmm(x.expand(parts, *x.shape), blocks)  # [parts, N, M / parts]
        return out.transpose(0, 1).reshape(x.shape[0], M)
    parts = _divisor(K, splits) if splits > 1 else 1
    if parts == 1:
        return torch.mm(x, w)
    rows = x.reshape(x.shape[0], parts, K // parts).transpose(0, 1)  # [parts, N, K / parts]
    return torch.bmm(rows, w.view(parts, K // parts, M)).sum(0)


@torch.library.custom_op("llm_llama_model::product_in_blocks", mutates_args=())
def _product_op(x: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
    """:func:`_product` as one operator for torch.compile'd graphs."""
    return _product(x, w, splits)


@_product_op.register_fake
def _product_shape(x: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
    """The op's output for shapes only (tracing): ``[N, M]``."""
    return x.new_empty(x.shape[0], w.shape[1])


def _product_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, w, _ = inputs
    ctx.save_for_backward(x, w)


def _product_backward(ctx, grad: torch.Tensor) -> tuple:
    """Gradients of ``x @ w``: ``grad @ w.T`` and ``x.T @ grad`` (none for ``splits``)."""
    x, w = ctx.saved_tensors
    grad_x = grad @ w.t() if ctx.needs_input_grad[0] else None
    grad_w = x.t() @ grad if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_product_op.register_autograd(_product_backward, setup_context=_product_context)


class Packed:
    """Linear layers that share an input, packed into one transposed matrix ``[in, sum(out)]``.

    One matrix product then computes all of them, and a matrix with few inputs and many outputs
    is read faster in this layout by a CPU matrix-vector product (measured in bench/). The
    layers' own parameters become views into the packed matrix, so the state dict and
    ``load_state_dict`` (which copies into them) keep working. If a parameter is replaced (e.g.
    ``load_state_dict(assign=True)`` or a dtype or device change), :meth:`intact` turns False;
    the part then drops the pack before its next forward and uses the separate products.
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        first = linears[0].weight
        total = sum(lin.weight.shape[0] for lin in linears)
        self.weight_t = torch.empty(first.shape[1], total, dtype=first.dtype, device=first.device)
        biased = linears[0].bias is not None
        self.bias = torch.empty(total, dtype=first.dtype, device=first.device) if biased else None
        offset = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            block = self.weight_t[:, offset : offset + rows]
            block.copy_(lin.weight.t())
            lin.weight = nn.Parameter(block.t(), requires_grad=False)
            if self.bias is not None:
                piece = self.bias[offset : offset + rows]
                piece.copy_(lin.bias)
                lin.bias = nn.Parameter(piece, requires_grad=False)
            offset += rows
        self.linears = linears
        self._pointers = self._current(linears)

    @staticmethod
    def _current(linears: list[nn.Linear]) -> list[int]:
        pointers = [lin.weight.data_ptr() for lin in linears]
        return pointers + [lin.bias.data_ptr() for lin in linears if lin.bias is not None]

    def intact(self) -> bool:
        """True while every packed layer's parameters are still the views made by packing."""
        return self._current(self.linears) == self._pointers

    def __call__(self, x: torch.Tensor, splits: int = 1) -> torch.Tensor:
        """All the packed layers' outputs side by side: ``x [N, in] -> [N, sum(out)]``,
        computed in ``splits`` blocks (see :func:`_product`)."""
        if splits > 1:
            out = _product(x, self.weight_t, splits)
            return out if self.bias is None else out.add_(self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)


def _own(module: nn.Module) -> None:
    """Give ``module``'s own parameters their own memory (a copy, e.g. out of a memory map)."""
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=False))


def _residual_linear(
    h: torch.Tensor, x: torch.Tensor, linear: nn.Linear, splits: int = 1
) -> torch.Tensor:
    """``h + linear(x)`` for 2-d ``h`` and ``x``: one matrix product with the residual as the
    addend, or ``splits`` blocks (see :func:`_product`) and then the residual."""
    if splits > 1:
        out = _product(x, linear.weight.t(), splits).add_(h)
    else:
        out = torch.addmm(h, x, linear.weight.t())
    return out if linear.bias is None else out.add_(linear.bias)


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
        self.packed: Packed | None = None

    def qkv(self, x: torch.Tensor, splits: int = 1) -> torch.Tensor:
        """q, k and v projections of ``x [N, hidden]`` side by side, ``[N, (heads + 2 kv) hd]``."""
        if self.packed is not None:
            return self.packed(x, splits)
        return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)

    def forward(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        shape: tuple[int, int],
        step: Step,
        kv: LayerKV | None,
    ) -> torch.Tensor:
        """``h + attention(x)`` for the residual ``h`` and normed ``x``, both ``[B*T, hidden]``."""
        B, T = shape
        hd, heads, kv_heads = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(x, step.splits)
        # RoPE rotates q and k together, in the [B, T, heads, hd] layout the projection gives.
        qk = qkv[:, : (heads + kv_heads) * hd].view(B, T, heads + kv_heads, hd)
        qk = rope.apply_rope(qk, step.cos, step.sin)
        q = qk[:, :, :heads].transpose(1, 2)  # [B, heads, T, hd]
        k = qk[:, :, heads:].transpose(1, 2)  # [B, kv_heads, T, hd]
        v = qkv[:, (heads + kv_heads) * hd :].view(B, T, kv_heads, hd).transpose(1, 2)
        if kv is not None:
            end = step.start + T
            kv.k[:B, :, step.start : end] = k
            kv.v[:B, :, step.start : end] = v
            k, v = kv.k[:B, :, :end], kv.v[:B, :, :end]
        # enable_gqa shares each key/value head among its query heads (= repeat_kv, no copy)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B * T, heads * hd)
        return _residual_linear(h, out, self.o_proj, step.splits)

    def pack(self) -> None:
        """Pack q, k and v into one transposed matrix (see Packed); o gets memory of its own."""
        self.packed = Packed([self.q_proj, self.k_proj, self.v_proj])
        _own(self.o_proj)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, **factory) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden, inner, bias=bias, **factory)
        self.down_proj = nn.Linear(inner, hidden, bias=bias, **factory)
        self.packed: Packed | None = None

    def forward(self, h: torch.Tensor, x: torch.Tensor, splits: int = 1) -> torch.Tensor:
        """``h + mlp(x)`` for the residual ``h`` and normed ``x``, both ``[N, hidden]``; each
        product in ``splits`` blocks (see :func:`_product`)."""
        if self.packed is not None:
            both = self.packed(x, splits)
            inner = both.shape[-1] // 2
            gate, up = both[:, :inner], both[:, inner:]  # (slicing is cheaper than chunk)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return _residual_linear(h, F.silu(gate).mul_(up), self.down_proj, splits)

    def pack(self) -> None:
        """Pack gate and up into one transposed matrix (see Packed); down gets memory of its own."""
        self.packed = Packed([self.gate_proj, self.up_proj])
        _own(self.down_proj)


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


class LlamaPart(nn.Module):
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
        spec = PartSpec.parse(spec) if isinstance(spec, str) else spec
        self.config, self.spec = config, _resolve(spec, config.num_hidden_layers)
        factory = {"device": device, "dtype": dtype}
        if self.spec.begin:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, **factory) for _ in self.spec.layers)
        if self.spec.end:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        self.register_buffer("inv_freq", rope.inv_freq(config).to(device), persistent=False)
        self._head: Packed | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the part's weights (and of the hidden states it returns)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device of the part's weights."""
        return next(self.parameters()).device

    def tie_weights(self) -> None:
        """Share one tensor between embeddings and head when the config ties them and both exist."""
        if self.config.tie_word_embeddings and self.spec.begin and self.spec.end:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache of ``batch_size`` rows of up to ``max_len`` positions for this part's layers."""
        if batch_size < 1 or max_len < 1:
            raise LlamaModelError(
                f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}"
            )
        window = self.config.sliding_window
        if window is not None and window < max_len:
            raise LlamaModelError(
                f"max_len {max_len} exceeds the model's sliding_window {window}; sliding-window "
                f"attention is not implemented, so ask for max_len <= {window}"
            )
        c = self.config
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        dev, dtype = self.device, self.dtype
        layers = [
            LayerKV(
                torch.zeros(shape, device=dev, dtype=dtype),
                torch.zeros(shape, device=dev, dtype=dtype),
            )
            for _ in self.layers
        ]
        return KVCache(layers, batch_size, max_len, dev)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Run the part on T new positions; see the package README for shapes."""
        B, T = self._check_input(x)
        self._drop_stale_packs()
        mask = _check_mask(mask, B, T, x.device)
        start = self._check_cache(cache, B, T)
        h = self.embed_tokens(x) if self.spec.begin else x.to(self.dtype)
        splits = thread_splits(B * T, h.device, h.dtype)
        if len(self.layers):
            step = self._step(mask, cache, start, h.dtype, splits)
            for i, layer in enumerate(self.layers):
                h = layer(h, step, cache.layers[i] if cache is not None else None)
        if cache is not None:
            _advance(cache, mask, start)
        if self.spec.end:
            normed = self.norm(h)
            if self._head is not None:
                return self._head(normed.view(B * T, -1), splits).view(B, T, -1).float()
            return self.lm_head(normed).float()
        return h

    @torch.compiler.disable
    def _drop_stale_packs(self) -> None:
        """Forget packs whose layers' parameters were replaced since packing (see Packed)."""
        for layer in self.layers:
            for owner in (layer.self_attn, layer.mlp):
                if owner.packed is not None and not owner.packed.intact():
                    owner.packed = None
        if self._head is not None and not self._head.intact():
            self._head = None

    def pack(self) -> LlamaPart:
        """Repack the weights for fast inference; returns ``self``.

        q/k/v and gate/up each become one transposed matrix and so does the head (see
        :class:`Packed`): fewer, larger matrix products, read faster by a CPU matrix-vector
        product (decode is ~15% faster on SmolLM2 on a CPU, see bench/llama_decode.py). This
        copies the weights of the layers and the head once into new memory, so the memory-mapped
        files they came from are released (an untied embedding stays mapped: a lookup reads only
        its rows); packed parameters become views into the packed matrices, so ``state_dict()``
        still gives every weight under its Hugging Face name (some as non-contiguous views). Pack
        after any change of dtype or device: such a change replaces the parameters and the part
        goes back to separate products (still correct, just slower).
        """
        with torch.no_grad():
            for layer in self.layers:
                layer.self_attn.pack()
                layer.mlp.pack()
                _own(layer.input_layernorm)
                _own(layer.post_attention_layernorm)
            if self.spec.end:
                _own(self.norm)
                tied = self.spec.begin and self.lm_head.weight is self.embed_tokens.weight
                self._head = Packed([self.lm_head])
                if tied:
                    self.embed_tokens.weight = self.lm_head.weight
        return self

    def _step(
        self,
        mask: torch.Tensor,
        cache: KVCache | None,
        start: int,
        dtype: torch.dtype,
        splits: int,
    ) -> Step:
        B, T = mask.shape
        seen = cache.seen[:B, None] if cache is not None else 0
        positions = (seen + mask.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
        cos, sin = rope.cos_sin(self.inv_freq, positions, dtype)
        keys = mask if cache is None else torch.cat((cache.valid[:B, :start], mask), dim=1)
        allowed = _attention_mask(keys, start)
        # SDPA turns a bool mask into this additive one on every call; do it once per forward.
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return Step(cos, sin, additive.masked_fill_(~allowed, float("-inf")), start, splits)

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise LlamaModelError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.device != self.device:
            raise LlamaModelError(
                f"x is on {x.device} but this part's weights are on {self.device}"
            )
        if self.spec.begin:
            return _check_ids(x, self.config.vocab_size)
        H = self.config.hidden_size
        if x.dim() != 3 or x.shape[-1] != H or not x.is_floating_point():
            raise LlamaModelError(
                f"this part (spec {str(self.spec)!r}) takes hidden states [B, T, {H}], "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[1] == 0:
            raise LlamaModelError("x holds no positions (T == 0)")
        return x.shape[0], x.shape[1]

    def _check_cache(self, cache: KVCache | None, batch: int, new: int) -> int:
        window = self.config.sliding_window
        if cache is None:
            if window is not None and new > window:
                raise LlamaModelError(f"{new} positions exceed the sliding_window {window}")
            return 0
        if not isinstance(cache, KVCache) or len(cache.layers) != len(self.layers):
            raise LlamaModelError("cache was not made by this part's new_cache()")
        if batch > cache.batch_size:
            raise LlamaModelError(
                f"batch of {batch} rows is larger than the cache's {cache.batch_size}"
            )
        if cache.length + new > cache.max_len:
            raise LlamaModelError(
                f"sequence too long: {cache.length} cached + {new} new positions exceed "
                f"max_len {cache.max_len}"
            )
        return cache.length


def _resolve(spec: PartSpec, num_layers: int) -> PartSpec:
    try:
        return spec.resolve(num_layers)
    except ValueError as err:
        raise LlamaModelError(
            f"part spec {spec} does not fit a {num_layers}-layer model: {err}"
        ) from err


def _check_ids(x: torch.Tensor, vocab_size: int) -> tuple[int, int]:
    if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32) or x.shape[1] == 0:
        raise LlamaModelError(
            f"this part takes token ids LongTensor[B, T], got {x.dtype} {tuple(x.shape)}"
        )
    low, high = int(x.min()), int(x.max())
    if low < 0 or high >= vocab_size:
        raise LlamaModelError(f"token ids must lie in [0, {vocab_size}), got min {low} max {high}")
    return x.shape[0], x.shape[1]


def _check_mask(mask: torch.Tensor | None, batch: int, new: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, new, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, new):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise LlamaModelError(f"mask must be a [B, T] = [{batch}, {new}] tensor, got {shape}")
    if mask.dtype != torch.bool:
        if (
            mask.is_floating_point()
            or mask.is_complex()
            or not bool(((mask == 0) | (mask == 1)).all())
        ):
            raise LlamaModelError(
                "mask must be bool or an integer tensor of 0 and 1 (1 = real token)"
            )
        mask = mask.bool()
    return mask.to(device)


def _attention_mask(keys: torch.Tensor, start: int) -> torch.Tensor:
    """[B, 1, T, S] bool: query t (slot start + t) sees real key slots up to its own.

    Every query also sees its own slot, so a padding query never has an empty row (which would
    give NaN); what a padding position computes is never seen by a real one.
    """
    S = keys.shape[1]
    q_slot = torch.arange(start, S, device=keys.device)[:, None]  # [T, 1]
    k_slot = torch.arange(S, device=keys.device)[None, :]  # [1, S]
    allowed = (keys[:, None, :] & (k_slot <= q_slot)) | (k_slot == q_slot)  # [B, T, S]
    return allowed[:, None]


def _advance(cache: KVCache, mask: torch.Tensor, start: int) -> None:
    B, T = mask.shape
    cache.valid[:B, start : start + T] = mask
    cache.seen[:B] += mask.sum(1)
    cache.length = start + T
