"""Matrix products on CPU off the decode kernel: oneDNN for several rows, blocks for one.

Where :mod:`~.kernel` (a packed float32 weight, 1-8 rows) does not take a product, these do:

A decode step streams every weight through products of a few input rows, and torch's own CPU
products are slow there: one row runs single-threaded, and 2-16 rows read the weight at half the
speed oneDNN does. So a float32 CPU product of :data:`ONEDNN_MIN_ROWS` rows or more runs as
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, its own threads, the bias fused) on the
weight as it is stored, packed or not (no copy; see :func:`onednn_suits`). A product of one row
is cut instead into one block of the weight per thread and run as one ``torch.bmm``, which torch
spreads over its threads (:func:`product`). Where this torch has no oneDNN linear, every product
takes torch's own path.
"""

from __future__ import annotations

import torch

# A CPU product with this many input rows or fewer (decoding, short prompts) is cut into blocks.
SPLIT_MAX_ROWS = 16
# A float32 CPU product with at least this many input rows runs on oneDNN (one row: torch.mm on
# the packed layout reads faster; 2 rows and up, oneDNN reads 1.1-2.5x faster than torch.mm on one
# thread and than the blocks on two, on SmolLM2 and Falcon-7B shapes from 2 to 512 rows) ...
ONEDNN_MIN_ROWS = 2
# ... when its weight has more elements than this (1 MiB of float32): oneDNN spends ~15-20 us
# setting up each call, more than a smaller product takes with torch.mm.
ONEDNN_MIN_WEIGHT = 2**18


def _find_onednn_linear():
    """oneDNN's linear op when this torch has one that works here, else None (checked once)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        out = op(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4), "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    return op if torch.equal(out, torch.full((2, 4), 4.0)) else None


_ONEDNN_LINEAR = _find_onednn_linear()


def onednn_suits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when ``x [N, K] @ w [K, M]`` runs faster on oneDNN (:func:`onednn_product`): the op
    exists; a float32 CPU product of :data:`ONEDNN_MIN_ROWS` rows or more; a weight of more than
    :data:`ONEDNN_MIN_WEIGHT` elements stored contiguous either way round (a packed ``[in, out]``
    or a layer's ``[out, in]`` seen transposed); no gradient wanted (oneDNN's op has none); not
    in a compiled graph."""
    return (
        _ONEDNN_LINEAR is not None
        and x.shape[0] >= ONEDNN_MIN_ROWS
        and w.numel() > ONEDNN_MIN_WEIGHT
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.device.type == "cpu"
        and (w.is_contiguous() or w.t().is_contiguous())
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and not torch.compiler.is_compiling()  # (inductor lowers the op only on frozen weights)
    )


def onednn_product(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [N, K] @ w [K, M] + bias`` as oneDNN's linear on ``w``'s memory (no copy); only where
    :func:`onednn_suits` says so."""
    return _ONEDNN_LINEAR(x, w.t(), bias, "none", [], "")


@torch.compiler.disable
def thread_splits(rows: int, device: torch.device, dtype: torch.dtype) -> int:
    """How many blocks to cut each product of ``rows`` input rows into: one per torch thread for
    a small float32/float64 product on a CPU, else 1 (read on each call, outside compiled graphs).
    """
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64) or rows > SPLIT_MAX_ROWS:
        return 1  # (half-precision partial sums would round once more than one product does)
    return torch.get_num_threads()


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most``."""
    while n % at_most:
        at_most -= 1
    return at_most


def product(x: torch.Tensor, w: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """``x [N, K] @ w [K, M]``, with ``splits > 1`` as one batched product of blocks of ``w``.

    A wide ``w`` (at least 8 times as many columns as rows: a head) is cut into column blocks,
    any other into row blocks whose partial products are summed (the same sum in another order:
    float32 rounding, ~1e-7 relative). Both cuts are views of ``w`` whatever its strides
    (splitting one dimension always is), so nothing is copied but the small output.
    """
    if splits > 1 and torch.compiler.is_compiling():
        # inductor would lower the batched product into a loop of its own, slower than the
        # library's one-thread product; as a custom op the blocks stay one opaque call.
        return torch.ops.llm_slice_core.product_in_blocks(x, w, splits)
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


@torch.library.custom_op("llm_slice_core::product_in_blocks", mutates_args=())
def _product_op(x: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
    """:func:`product` as one operator for torch.compile'd graphs."""
    return product(x, w, splits)


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
