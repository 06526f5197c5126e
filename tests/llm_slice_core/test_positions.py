"""Mask checks, positions from the mask and the cache, and the keys each new token may see."""

from __future__ import annotations

import pytest
import torch

from llm_slice_core import InputError, Slots, additive_mask, allowed_keys, check_mask, new_positions
from llm_slice_core.positions import uncached_slots


def test_a_missing_mask_is_all_real_and_ints_become_bools():
    assert check_mask(None, 2, 3, torch.device("cpu")).all()
    got = check_mask(torch.tensor([[0, 1, 1]]), 1, 3, torch.device("cpu"))
    assert got.dtype == torch.bool and got.tolist() == [[False, True, True]]


@pytest.mark.parametrize(
    ("mask", "match"),
    [(torch.ones(1, 3), "bool or integer 0/1"), (torch.tensor([[0, 2, 1]]), "0 \\(padding\\)"),
     (torch.ones(2, 3, dtype=torch.bool), r"\[1, 3\]"), ([[1, 1, 1]], "list")],
)  # fmt: skip
def test_malformed_masks_name_the_argument(mask, match):
    with pytest.raises(InputError, match=match):
        check_mask(mask, 1, 3, torch.device("cpu"))


def test_positions_count_the_real_tokens_and_padding_gets_zero():
    """One rule, both families: a padding slot's position is 0 (it was clamped in one family
    and masked in the other), whether it comes before, between or after real tokens."""
    mask = torch.tensor([[False, False, True, True], [True, False, True, False]])
    seen = torch.tensor([0, 5])
    assert new_positions(mask, seen).tolist() == [[0, 0, 0, 1], [5, 0, 6, 0]]


def test_keys_a_token_may_see():
    slots = uncached_slots(torch.tensor([[False, True, True]]))
    allowed = allowed_keys(slots)[0, 0].tolist()
    # the padding query sees only itself; real queries see real keys up to their own slot
    assert allowed == [[True, False, False], [False, True, False], [False, True, True]]
    additive = additive_mask(allowed_keys(slots), torch.float32)[0, 0]
    assert additive[2].tolist() == [float("-inf"), 0.0, 0.0]
    assert slots.padded and slots.key_positions().tolist() == [[0, 0, 1]]


def test_keys_of_a_decode_step_after_a_cache():
    real = torch.tensor([[False, True, True, True], [True, True, True, True]])
    slots = Slots(3, torch.tensor([[2], [3]]), real, padded=True)
    allowed = allowed_keys(slots)
    assert allowed.shape == (2, 1, 1, 4)
    assert allowed[:, 0, 0].tolist() == real.tolist()
    assert slots.key_positions().tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]
