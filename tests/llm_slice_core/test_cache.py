"""KVCache bookkeeping: plan/advance, rows in use, keep_rows and join (right-aligned)."""

from __future__ import annotations

import pytest
import torch

from llm_slice_core import CacheError, KVCache, cache_bytes


def cache(batch=4, max_len=8, layers=2) -> KVCache:
    return KVCache(layers, batch, max_len, kv_heads=2, head_dim=3)


def fill(c: KVCache, mask: list[list[int]], value: float) -> None:
    """One forward's bookkeeping, with every new key and value set to ``value + row``."""
    mask = torch.tensor(mask, dtype=torch.bool)
    slots = c.plan(mask)
    for kv in c.layers:
        rows = torch.arange(mask.shape[0], dtype=torch.float32)[:, None, None, None]
        new = (value + rows).expand(mask.shape[0], 2, mask.shape[1], 3)
        kv.update(slots.start, new, new)
    c.advance(slots)


def test_nbytes_is_cache_bytes_and_counts_bookkeeping():
    c = cache(3, 5)
    assert c.nbytes() == cache_bytes(2, 3, 5, 2, 3, torch.float32)
    assert c.nbytes() == 2 * 2 * 3 * 2 * 5 * 3 * 4 + 3 * 5 + 3 * 8
    assert c.bytes_per_token() == 2 * 2 * 2 * 3 * 4


def test_plan_and_advance_track_rows_length_and_seen():
    c = cache()
    fill(c, [[0, 1, 1], [1, 1, 1]], 0)
    assert (c.rows, c.length, c.seen[:2].tolist(), c.padded) == (2, 3, [2, 3], True)
    slots = c.plan(torch.ones(3, 1, dtype=torch.bool))  # a third row joins late: padding before
    assert slots.positions.tolist() == [[2], [3], [0]] and slots.padded
    c.advance(slots)
    assert c.rows == 3 and c.real[2, :4].tolist() == [False, False, False, True]


def test_a_refused_plan_leaves_the_cache_as_it_was():
    c = cache(2, 4)
    fill(c, [[1, 1, 1]], 0)
    with pytest.raises(CacheError, match="max_len 4"):
        c.plan(torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(CacheError, match="batch_size 2"):
        c.plan(torch.ones(3, 1, dtype=torch.bool))
    assert (c.length, c.rows, int(c.seen[0])) == (3, 1, 3)


def test_keep_rows_reorders_and_drops_slots_no_kept_row_uses():
    c = cache()
    fill(c, [[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]], 10)
    c.keep_rows([2, 1])
    assert (c.rows, c.length) == (2, 3)  # slot 0 held only row 0's token
    assert c.real[:2, :3].tolist() == [[True, True, True], [False, True, True]]
    assert c.seen[:3].tolist() == [3, 2, 0]
    assert c.layers[0].k[0, 0, :, 0].tolist()[:3] == [12.0] * 3  # row 2's keys, now row 0
    assert c.layers[1].v[1, 0, 1:3, 0].tolist() == [11.0, 11.0]
    c.keep_rows([])
    assert (c.rows, c.length, bool(c.real.any())) == (0, 0, False)


def test_join_right_aligns_the_shorter_side():
    running, newcomer = cache(), cache(1, 8)
    fill(running, [[1, 1], [1, 1]], 0)
    fill(newcomer, [[1, 1, 1, 1]], 5)
    running.join(newcomer)
    assert (running.rows, running.length) == (3, 4)
    assert running.real[:3, :4].tolist() == [[False, False, True, True]] * 2 + [[True] * 4]
    assert running.layers[0].k[1, 0, 2:4, 0].tolist() == [1.0, 1.0]  # row 1 moved right
    assert running.layers[0].k[2, 0, :4, 0].tolist() == [5.0] * 4
    assert running.seen[:3].tolist() == [2, 2, 4] and running.padded
    assert newcomer.joined and newcomer.layers == []
    with pytest.raises(CacheError, match="joined"):
        newcomer.plan(torch.ones(1, 1, dtype=torch.bool))
    shorter = cache(1, 8)
    fill(shorter, [[1]], 7)
    running.join(shorter)
    assert running.real[3, :4].tolist() == [False, False, False, True]


def test_join_refuses_caches_that_do_not_fit():
    running = cache(2, 4)
    fill(running, [[1, 1]], 0)
    with pytest.raises(CacheError, match="another part"):
        running.join(KVCache(3, 1, 4, kv_heads=2, head_dim=3))
    with pytest.raises(CacheError, match="another part"):
        running.join(KVCache(2, 1, 4, kv_heads=2, head_dim=3, owner=object()))
    long = cache(1, 8)
    fill(long, [[1] * 5], 0)
    with pytest.raises(CacheError, match="max_len 4"):
        running.join(long)
    with pytest.raises(CacheError, match="cannot join itself"):
        running.join(running)
