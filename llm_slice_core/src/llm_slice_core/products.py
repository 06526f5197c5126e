"""Matrix products of decode steps on several CPU threads: one batched product of blocks.

torch's CPU matrix-vector product runs on one thread. A decode step's products (a few input
rows) are cut instead into one block of the weight per thread and run as one ``torch.bmm``, which
torch spreads over its threads. Prefill (more rows) is already multi-threaded and is not cut.
"""

from __future__ import annotations

import torch

# A CPU product with this many input rows or fewer (decoding, short prompts) is cut into blocks.
SPLIT_MAX_ROWS = 16


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
