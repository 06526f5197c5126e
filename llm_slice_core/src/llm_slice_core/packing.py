"""Packed weights: linear layers that share an input become one matrix, stored for fast reads.

On a CPU a decode step streams every weight through small matrix-vector products. Packing
(:meth:`Linears.pack`) copies the weights of layers that share an input into one matrix stored
transposed (``[in, sum(out)]``; a CPU matrix-vector product reads a matrix with few inputs and
many outputs faster this way), so one product computes them all; a single output projection
just gets memory of its own in its own layout. The layers' parameters become views into the
packed matrix, so state-dict names and ``load_state_dict`` (which copies into them) keep working.
Replacing a parameter (``load_state_dict(assign=True)``, ``.to(dtype)``) leaves the pack stale:
:meth:`Linears.intact` turns False and :func:`drop_stale` makes the group use the layers again.

A pack can be stored and used again without a copy: :meth:`Linears.export` gives the packed
tensors (``weight_t [in, sum(out)]``, or ``weight [out, in]`` for an output projection, and
``bias``), :meth:`Linears.packed_form` builds them from a checkpoint's tensors, and
:meth:`Linears.adopt` makes given tensors (e.g. views of a memory-mapped file) the pack, the
layers' parameters views into them as after :meth:`Linears.pack`. :func:`named_groups` names a
module's groups (``"self_attn.qkv"``), the prefixes of their keys in a stored packed state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import kernel
from .errors import WeightsError
from .products import onednn_product, onednn_suits, product


class Linears:
    """``nn.Linear`` layers sharing an input, computed side by side: ``[N, in] -> [N, sum(out)]``.

    A model holds one per group (``self.qkv = Linears(self.q_proj, self.k_proj, self.v_proj)``)
    and calls it with the thread ``splits`` of the step (see :func:`~.products.product`);
    ``residual`` is added to the output (in the product itself when it can be). With
    ``bias_after`` the bias is added after the product, never fused into it (``x @ W.T`` then
    ``+ b``, one more rounding in half precision: how some models were trained). It is not a
    module: the layers stay where the model put them, under their checkpoint names.
    """

    def __init__(self, *linears: nn.Linear, bias_after: bool = False, transpose: bool = True):
        if not transpose and len(linears) != 1:
            raise ValueError("only a single linear layer can be packed without transposing")
        self.linears = linears
        self.bias_after = bias_after
        # the decode kernel reads [in, out] only: with it, every group is stored transposed
        self.transpose = transpose or kernel.available()
        self.weight_t: torch.Tensor | None = None  # [in, sum(out)] once packed, else None
        self.bias: torch.Tensor | None = None
        self._pointers: list[int] = []

    @property
    def packed(self) -> bool:
        """True while the group computes from its packed matrix."""
        return self.weight_t is not None

    def __call__(
        self, x: torch.Tensor, splits: int = 1, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``residual + x @ W.T + b`` for the layers side by side; ``x`` is ``[N, in]``."""
        if self.weight_t is not None:
            return self._affine(x, self.weight_t, self.bias, splits, residual)
        outs = [self._affine(x, lin.weight.t(), lin.bias, splits, None) for lin in self.linears]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out if residual is None else out.add_(residual)

    def _affine(self, x, w_t, bias, splits: int, residual) -> torch.Tensor:
        if kernel.suits(x, w_t, bias):  # a few float32 rows on a CPU, packed: the kernel
            fast = kernel.product
        elif onednn_suits(x, w_t):  # several rows on a CPU (see products): oneDNN
            fast = onednn_product
        else:
            fast = None
        if fast is not None:  # the bias is fused unless it must come after the product
            fuse = bias is not None and not self.bias_after
            out = fast(x, w_t, bias if fuse else None)
            bias = None if fuse else bias
        elif splits > 1:
            out = product(x, w_t, splits)
        elif residual is not None:
            out, residual = torch.addmm(residual, x, w_t), None
        elif bias is not None and not self.bias_after:
            return torch.addmm(bias, x, w_t)
        else:
            out = torch.mm(x, w_t)
        if residual is not None:
            out = out.add_(residual)
        return out if bias is None else out.add_(bias)

    def pack(self) -> None:
        """Copy the layers' weights into one packed matrix (one copy); their parameters become
        views into it. Called again after a dtype or device change, packs the new weights."""
        with torch.no_grad():
            first = self.linears[0].weight
            total = sum(lin.weight.shape[0] for lin in self.linears)
            factory = {"dtype": first.dtype, "device": first.device}
            if self.transpose:
                weight_t = torch.empty(first.shape[1], total, **factory)
            else:
                weight_t = torch.empty(first.shape, **factory).t()
            biased = self.linears[0].bias is not None
            bias = torch.empty(total, **factory) if biased else None
            offset = 0
            for lin in self.linears:
                rows = lin.weight.shape[0]
                weight_t[:, offset : offset + rows].copy_(lin.weight.t())
                if bias is not None:
                    bias[offset : offset + rows].copy_(lin.bias)
                offset += rows
        self._become(weight_t, bias)

    def _become(self, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Make ``weight_t`` / ``bias`` the pack, the layers' parameters views into them."""
        offset = 0
        for lin in self.linears:
            rows = lin.out_features
            lin.weight = nn.Parameter(weight_t[:, offset : offset + rows].t(), requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias[offset : offset + rows], requires_grad=False)
            offset += rows
        self.weight_t, self.bias = weight_t, bias
        self._pointers = self._current()

    def unpack(self) -> None:
        """Compute from the layers' own parameters again (they keep whatever memory they have)."""
        self.weight_t = self.bias = None

    def stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors :meth:`export` gives and :meth:`adopt` takes:
        ``weight_t [in, sum(out)]`` (or, for an output projection, ``weight [out, in]``: its
        packed memory in its own layout) and ``bias [sum(out)]`` when the layers have biases."""
        inputs = self.linears[0].in_features
        total = sum(lin.out_features for lin in self.linears)
        shapes = {"weight_t": (inputs, total)} if self.transpose else {"weight": (total, inputs)}
        if self.linears[0].bias is not None:
            shapes["bias"] = (total,)
        return shapes

    def export(self) -> dict[str, torch.Tensor]:
        """The packed tensors, contiguous, keyed as :meth:`stored_shapes` says: what a packed
        file holds for this group. Views of the pack when packed, else built (one copy)."""
        if self.weight_t is None:
            pieces = [(lin.weight, lin.bias) for lin in self.linears]
            return self.packed_form([w for w, _ in pieces], [b for _, b in pieces])
        weight = self.weight_t if self.transpose else self.weight_t.t()
        out = {"weight_t" if self.transpose else "weight": weight}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def packed_form(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        """:meth:`export`'s tensors built from the layers' ``weight`` / ``bias`` tensors given
        in the group's order (e.g. views of a checkpoint file; one copy, as :meth:`pack` makes).
        """
        with torch.no_grad():
            if self.transpose:
                weight = torch.cat([w.t() for w in weights], dim=1).contiguous()
                out = {"weight_t": weight}
            else:
                out = {"weight": weights[0].contiguous()}
            if biases[0] is not None:
                out["bias"] = torch.cat(list(biases)).contiguous()
        return out

    def adopt(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Compute from the given packed tensors (as :meth:`export` gives them) without a copy:
        they become the pack and the layers' parameters become views into them, exactly as after
        :meth:`pack`. Raises :class:`~.errors.WeightsError` for wrong keys, shapes or layouts."""
        shapes = self.stored_shapes()
        if set(tensors) != set(shapes):
            raise WeightsError(
                f"a packed group takes tensors {sorted(shapes)}, got {sorted(tensors)}"
            )
        for key, shape in shapes.items():
            t = tensors[key]
            if tuple(t.shape) != shape or not t.is_contiguous():
                raise WeightsError(
                    f"packed {key!r} must be a contiguous {shape}, got "
                    f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}"
                )
        weight_t = tensors["weight_t"] if self.transpose else tensors["weight"].t()
        self._become(weight_t, tensors.get("bias"))

    def _current(self) -> list[int]:
        pointers = [lin.weight.data_ptr() for lin in self.linears]
        return pointers + [lin.bias.data_ptr() for lin in self.linears if lin.bias is not None]

    def intact(self) -> bool:
        """True while every layer's parameters are still the views packing made."""
        return self._current() == self._pointers


def groups(module: nn.Module) -> list[Linears]:
    """Every :class:`Linears` held by ``module`` or its submodules."""
    return [group for _, group in named_groups(module)]


def named_groups(module: nn.Module) -> list[tuple[str, Linears]]:
    """Every :class:`Linears` of ``module`` with its name: the attribute's path from ``module``
    (``"self_attn.qkv"``), the prefix of its tensors' keys in a packed state."""
    found = []
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, Linears):
                found.append((f"{prefix}.{attr}" if prefix else attr, value))
    return found


def own(module: nn.Module) -> None:
    """Give ``module``'s own parameters memory of their own (a copy, e.g. out of a memory map)."""
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=False))


def pack(module: nn.Module) -> list[Linears]:
    """Pack every :class:`Linears` group of ``module`` and give every other parameter memory of
    its own: afterwards nothing refers to the files the weights were mapped from. Returns the
    groups."""
    found = groups(module)
    for group in found:
        group.pack()
    packed = {id(lin) for group in found for lin in group.linears}
    for sub in module.modules():
        if id(sub) not in packed:
            own(sub)
    return found


@torch.compiler.disable
def drop_stale(found: list[Linears]) -> None:
    """Unpack the groups whose parameters were replaced since packing (see :class:`Linears`)."""
    for group in found:
        if group.packed and not group.intact():
            group.unpack()
