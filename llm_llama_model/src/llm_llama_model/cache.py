"""The explicit KV cache of a part: fixed-size buffers per layer plus per-row bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    """Keys and values of one layer, [batch, kv_heads, max_len, head_dim] each (post-RoPE keys)."""

    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    """Cache of one part for one batch; ``forward`` appends the new positions of every row.

    ``layers[i]`` belongs to the part's local layer slot i. ``valid[b, s]`` says whether slot s of
    row b holds a real token (False for padding); ``seen[b]`` counts row b's real tokens so far, so
    the next real token of row b gets position ``seen[b]``; ``length`` slots are filled in
    every row.
    """

    def __init__(self, layers: list[LayerKV], batch_size: int, max_len: int, device: torch.device):
        self.layers = layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)

    def reset(self) -> None:
        """Forget every position (the buffers are reused; stale keys are masked by ``valid``)."""
        self.length = 0
        self.valid.zero_()
        self.seen.zero_()

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return sum(kv.k.nbytes + kv.v.nbytes for kv in self.layers)
