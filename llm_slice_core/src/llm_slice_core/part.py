"""What a part of every family shares: loading weights into it, its cache, the forward driver.

A family's part subclasses :class:`ModelPart` and writes only its model: ``prepare`` (inputs to
the first layer's input and the step every layer shares), the layers, ``complete`` (the end).
:meth:`ModelPart.forward` is exactly ``prepare``, each ``layers[i](h, step, cache.layers[i])``,
``complete``, so a driver that streams layer weights runs the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from . import packing
from .cache import KVCache, cache_bytes
from .errors import CacheError, InputError, SliceError, WeightsError
from .positions import Slots, check_mask, uncached_slots
from .products import thread_splits


class SpecLike(Protocol):
    """A resolved part spec (``llm_sepweight.PartSpec``): begin?, layer range, end?"""

    begin: bool
    layers: range
    end: bool


class ModelPart(nn.Module):
    """Begin, a range of decoder layers and/or end of a model, as one module (see the module doc).

    A subclass sets ``config`` and ``spec`` (resolved), builds ``layers`` (an ``nn.ModuleList``,
    local slot ``i`` = global layer ``spec.layers.start + i``), the begin and end modules, and
    the sizes the shared code reads (``vocab_size``, ``hidden_size``, ``kv_heads``,
    ``head_dim``); it implements ``prepare`` and ``complete`` and names its
    ``embedding``, ``final_norm`` and ``head`` (a :class:`~.packing.Linears` over the lm head).
    """

    config: Any
    spec: SpecLike
    layers: nn.ModuleList
    vocab_size: int
    hidden_size: int
    kv_heads: int
    head_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.packs = False  # whether the weights are packed (and layers given later will be)
        self._groups: dict[int | str, list[packing.Linears]] = {}
        self._weightless: set[int] = set()
        self._placement = (torch.device("cpu"), torch.float32)
        self._token = object()  # marks the caches this part made

    # -- what a family provides ----------------------------------------------------------------

    def prepare(self, x: torch.Tensor, mask=None, cache=None) -> tuple[torch.Tensor, Any]:
        """``(h, step)``: the first layer's input and what every layer of this call shares."""
        raise NotImplementedError

    def complete(self, h: torch.Tensor, step: Any, cache=None) -> torch.Tensor:
        """Commit the call to the cache; the end's logits (float32) or ``h`` itself."""
        raise NotImplementedError

    # -- properties ----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the part's weights (and of its hidden states and cache)."""
        for param in self.parameters():
            if not param.is_meta:
                return param.dtype
        return self._placement[1]

    @property
    def device(self) -> torch.device:
        """The device of the part's weights."""
        for param in self.parameters():
            if not param.is_meta:
                return param.device
        return self._placement[0]

    # -- the forward driver --------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Run the part on ``T`` new tokens per row; with a cache, append them to it.

        ``x``: token ids ``[B, T]`` with begin, else hidden states ``[B, T, hidden]``; ``mask``
        ``[B, T]`` (bool or 0/1) marks real tokens, False/0 = left padding, None = all real.
        Returns float32 logits ``[B, T, vocab]`` with end, else hidden states. Exactly
        :meth:`prepare`, each layer, :meth:`complete` (under ``torch.no_grad``).
        """
        if self._weightless:
            raise SliceError(
                f"layer slots {sorted(self._weightless)} hold no weights: give them with "
                "set_layer_weights(i, tensors), or drive prepare/layers/complete yourself"
            )
        h, step = self.prepare(x, mask, cache)
        for i, layer in enumerate(self.layers):
            h = layer(h, step, None if cache is None else cache.layers[i])
        return self.complete(h, step, cache)

    def start_step(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[Slots, int]:
        """Check ``x``, ``mask`` and ``cache``; the call's :class:`Slots` (planned in the cache)
        and the thread splits of its products. For a family's ``prepare``."""
        packing.drop_stale([g for groups in self._groups.values() for g in groups])
        batch, steps = self._check_input(x)
        mask = check_mask(mask, batch, steps, x.device)
        slots = uncached_slots(mask) if cache is None else self._check_cache(cache).plan(mask)
        return slots, thread_splits(batch * steps, x.device, self.dtype)

    def end_step(self, slots: Slots, cache: KVCache | None) -> None:
        """Commit a finished call to the cache. For a family's ``complete``."""
        if cache is not None:
            cache.advance(slots)

    # -- the cache -----------------------------------------------------------------------------

    def check_max_len(self, max_len: int) -> None:
        """Raise :class:`CacheError` when the model cannot run ``max_len`` positions."""

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """Empty K/V buffers of ``batch_size`` rows by ``max_len`` slots for this part's layers,
        at the KV-head count, on the part's device and dtype."""
        self.check_max_len(max_len)
        return KVCache(
            len(self.layers), batch_size, max_len, self.kv_heads, self.head_dim,
            device=self.device, dtype=self.dtype, owner=self._token,
        )  # fmt: skip

    def cache_bytes(self, batch_size: int, max_len: int) -> int:
        """Exactly the bytes ``new_cache(batch_size, max_len)`` would allocate."""
        if batch_size < 1 or max_len < 1:
            raise CacheError(
                f"a cache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}"
            )
        self.check_max_len(max_len)
        sizes = (len(self.layers), batch_size, max_len, self.kv_heads, self.head_dim)
        return cache_bytes(*sizes, self.dtype)

    # -- weights -------------------------------------------------------------------------------

    @classmethod
    def assigned(
        cls,
        config: Any,
        spec: Any,
        state: Mapping[str, torch.Tensor],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        layers: bool = True,
    ) -> ModelPart:
        """The part ``cls(config, spec)`` built on ``meta`` with the given tensors as its
        parameters (part-relative keys, layers from slot 0; no copy, unless ``device`` or
        ``dtype`` convert a floating-point tensor that differs). With ``layers=False`` the
        state holds no layer and every layer slot stays weightless. Keys, shapes and dtypes are
        checked first (:class:`WeightsError`)."""
        part = cls(config, spec, device="meta")
        state = {k: _place(v, device, dtype) for k, v in state.items()}
        expected = part.state_dict()
        if not layers:
            expected = {k: v for k, v in expected.items() if not k.startswith("layers.")}
            part._weightless = set(range(len(part.layers)))
        _check_state(_shapes(expected), state, f"part {part.spec}")
        part.load_state_dict(state, strict=layers, assign=True)
        first = next(iter(state.values()), None)
        device = torch.device(device if device is not None else first.device if first is not None
                              else "cpu")  # fmt: skip
        dtype = dtype if dtype is not None else first.dtype if first is not None else torch.float32
        part._placement = (device, dtype)
        part.assigned_to(device)
        return part.requires_grad_(False).eval()

    def assigned_to(self, device: torch.device) -> None:
        """Called once the weights are assigned: tie the head, move non-weight buffers."""

    def set_layer_weights(
        self, i: int, tensors: Mapping[str, torch.Tensor], *, packed: bool = False
    ) -> None:
        """Give layer slot ``i`` its weights, without a copy, on the part's device and dtype.

        ``tensors`` are keyed as in the layer's ``mid`` file (``"self_attn.q_proj.weight"``);
        when the part packs (``load_part(..., pack=True)``) they are packed (one copy). With
        ``packed=True`` they are the layer's packed state instead, keyed as
        :meth:`packed_layer_state` gives it (e.g. views of a file it was written to): adopted
        as they are, no copy, and the layer then computes exactly as a resident packed layer,
        whether or not the part packs. Wrong keys, shapes, dtypes or layouts raise
        :class:`WeightsError` and leave the slot weightless.
        """
        layer = self._layer(i)
        self._release(i)
        expected = self.packed_layer_shapes(i) if packed else _shapes(layer.state_dict())
        _check_state(expected, tensors, f"layer slot {i}{' (packed)' if packed else ''}")
        if tensors:
            dtype, device = next(iter(tensors.values())).dtype, next(iter(tensors.values())).device
            if (dtype, device) != (self.dtype, self.device):
                raise WeightsError(
                    f"tensors for layer slot {i} are {dtype} on {device}, the part is "
                    f"{self.dtype} on {self.device}"
                )
        if packed:
            self._adopt(i, layer, tensors)
        else:
            layer.load_state_dict(tensors, assign=True)
            layer.requires_grad_(False)
            if self.packs:
                self._groups[i] = packing.pack(layer)
        self._weightless.discard(i)

    def _adopt(self, i: int, layer: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        named = packing.named_groups(layer)
        prefixes = [f"{name}." for name, _ in named]
        rest = {k: v for k, v in tensors.items() if not k.startswith(tuple(prefixes))}
        self._groups[i] = [group for _, group in named]  # a refusal below unpacks them all
        try:
            for name, group in named:
                group.adopt({k: tensors[f"{name}.{k}"] for k in group.stored_shapes()})
        except WeightsError as exc:
            self.drop_layer_weights(i)
            raise WeightsError(f"layer slot {i}: {exc}") from None
        layer.load_state_dict(rest, strict=False, assign=True)
        layer.requires_grad_(False)

    def packed_layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of layer slot ``i``'s packed state (:meth:`packed_layer_state`),
        known without its weights (e.g. to check a stored one)."""
        layer = self._layer(i)
        grouped = _grouped_keys(layer)
        shapes = {k: s for k, s in _shapes(layer.state_dict()).items() if k not in grouped}
        for name, group in packing.named_groups(layer):
            shapes.update({f"{name}.{k}": s for k, s in group.stored_shapes().items()})
        return shapes

    def packed_layer_state(
        self, i: int, tensors: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Layer slot ``i``'s weights in packed form, contiguous: each :class:`~.packing.Linears`
        group's packed tensors under the group's name (``"self_attn.qkv.weight_t"``, see
        :meth:`~.packing.Linears.export`), every other tensor under its own key.

        Built from ``tensors`` (keyed as the layer's ``mid`` file, e.g. views of it: one copy of
        the grouped weights; the slot may be weightless and is left as it is), or, with
        ``tensors`` None, from the slot's own weights (views when it is packed). This is what
        :meth:`set_layer_weights` takes with ``packed=True``: a streaming driver writes it to a
        file once and gives the part that file's mapped tensors on every pass, with no copy.
        """
        layer = self._layer(i)
        own = tensors is None
        if tensors is None:
            if i in self._weightless:
                raise WeightsError(f"layer slot {i} holds no weights: pass its tensors")
            tensors = layer.state_dict()
        else:
            _check_state(_shapes(layer.state_dict()), tensors, f"layer slot {i}")
        grouped = _grouped_keys(layer)
        out = {k: v.contiguous() for k, v in tensors.items() if k not in grouped}
        names = {id(module): name for name, module in layer.named_modules()}
        for name, group in packing.named_groups(layer):
            if own:
                packed = group.export()
            else:
                keys = [names[id(lin)] for lin in group.linears]
                packed = group.packed_form(
                    [tensors[f"{k}.weight"] for k in keys],
                    [tensors.get(f"{k}.bias") for k in keys],
                )
            out.update({f"{name}.{k}": v for k, v in packed.items()})
        return out

    def drop_layer_weights(self, i: int) -> None:
        """Make layer slot ``i`` weightless again (on ``meta``); its tensors are released."""
        self._release(i)
        self._layer(i).to_empty(device="meta")
        self._weightless.add(i)

    def pack(self) -> ModelPart:
        """Pack the weights for fast inference (see :mod:`~.packing`); returns ``self``.

        One copy of the layers' and the head's weights, after which nothing refers to the files
        they were mapped from (an untied embedding stays mapped: a lookup reads only its rows).
        Layers given later by :meth:`set_layer_weights` are packed too.
        """
        for i, layer in enumerate(self.layers):
            if i not in self._weightless:
                self._groups[i] = packing.pack(layer)
        if self.spec.end:
            lm_head = self.head.linears[0]
            tied = self.spec.begin and lm_head.weight is self.embedding.weight
            packing.own(self.final_norm)
            self.head.pack()
            if tied:
                self.embedding.weight = lm_head.weight
            self._groups["end"] = [self.head]
        self.packs = True
        return self

    def _layer(self, i: int) -> nn.Module:
        if not 0 <= i < len(self.layers):
            raise IndexError(f"layer slot {i} is not one of this part's {len(self.layers)} slots")
        return self.layers[i]

    def _release(self, i: int) -> None:
        for group in self._groups.pop(i, []):
            group.unpack()

    # -- checks --------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.device != self.device:
            raise InputError(f"x is on {x.device} but this part's weights are on {self.device}")
        if self.spec.begin:
            if x.ndim != 2 or x.dtype.is_floating_point or x.dtype in (torch.bool, torch.uint8):
                raise InputError(
                    "x of a part with begin must be token ids LongTensor[B, T], "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
        elif x.ndim != 3 or x.shape[-1] != self.hidden_size or not x.dtype.is_floating_point:
            raise InputError(
                f"x of a part without begin (spec {str(self.spec)!r}) must be hidden states "
                f"[B, T, {self.hidden_size}], got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise InputError(f"x is empty: shape {tuple(x.shape)}")
        if self.spec.begin:
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= self.vocab_size:
                raise InputError(
                    f"token ids in x must lie in [0, {self.vocab_size}), got min {low} max {high}"
                )
        return x.shape[0], x.shape[1]

    def _check_cache(self, cache: KVCache) -> KVCache:
        if not isinstance(cache, KVCache) or cache.owner is not self._token:
            raise CacheError(
                f"cache was not made by this part's new_cache(), got {type(cache).__name__}"
            )
        return cache


def _place(t: torch.Tensor, device, dtype) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t if device is None else t.to(device)


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _grouped_keys(layer: nn.Module) -> set[str]:
    """State-dict keys of the linear layers ``layer``'s :class:`~.packing.Linears` group."""
    linears = {id(lin) for _, group in packing.named_groups(layer) for lin in group.linears}
    keys = set()
    for name, module in layer.named_modules():
        if id(module) in linears:
            keys.update(f"{name}.{k}" for k, _ in module.named_parameters(recurse=False))
    return keys


def _check_state(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor], what: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"weights do not fit {what}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise WeightsError(
                f"weight {key!r} has shape {tuple(tensor.shape)}, {what} wants "
                f"{tuple(expected[key])}"
            )
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:
        raise WeightsError(f"weights of {what} must share a dtype, got {sorted(map(str, dtypes))}")
