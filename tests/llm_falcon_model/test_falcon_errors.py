"""Bad inputs are refused with llm_slice_core's shared errors (InputError, CacheError,
WeightsError), and a refused call leaves the cache untouched."""

from __future__ import annotations

import pytest
import torch

from llm_falcon_model import FalconConfig, FalconModelError, FalconPart
from llm_slice_core import CacheError, InputError, WeightsError

HF = dict(
    vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
    new_decoder_architecture=True, num_kv_heads=2,
)  # fmt: skip


@pytest.fixture
def config() -> FalconConfig:
    return FalconConfig.from_hf(HF)


@pytest.fixture
def whole(config) -> FalconPart:
    torch.manual_seed(0)
    return FalconPart(config, "f")


@pytest.mark.parametrize("ids", [[[1, 40]], [[-1, 3]]])
def test_ids_outside_the_vocabulary(whole, ids):
    with pytest.raises(InputError, match="token ids"):
        whole(torch.tensor(ids))


def test_float_input_to_a_part_with_begin(whole):
    with pytest.raises(InputError, match="token ids"):
        whole(torch.zeros(1, 3, 16))


@pytest.mark.parametrize("shape", [(1, 3, 15), (1, 3), (3, 16)])
def test_hidden_of_the_wrong_shape(config, shape):
    middle = FalconPart(config, "0-2")
    with pytest.raises(InputError, match="hidden states"):
        middle(torch.zeros(shape))


def test_integer_hidden_states_are_refused(config):
    with pytest.raises(InputError, match="hidden states"):
        FalconPart(config, "1-2 e")(torch.zeros(1, 2, 16, dtype=torch.long))


def test_batch_larger_than_the_cache(whole):
    cache = whole.new_cache(2, 8)
    with pytest.raises(CacheError, match="larger than the cache"):
        whole(torch.ones(3, 2, dtype=torch.long), cache=cache)


def test_sequence_longer_than_max_len_leaves_the_cache_usable(whole):
    cache = whole.new_cache(1, 5)
    whole(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(CacheError, match="max_len 5"):
        whole(torch.tensor([[4, 5, 6]]), cache=cache)
    assert cache.length == 3
    got = whole(torch.tensor([[4, 5]]), cache=cache)
    want = whole(torch.tensor([[1, 2, 3, 4, 5]]))[:, 3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(1, 3), "bool or integer 0/1"),
        (torch.ones(2, 3, dtype=torch.long), r"\[B, T\]"),
        (torch.ones(1, 4, dtype=torch.bool), r"\[B, T\]"),
        (torch.tensor([[0, 2, 1]]), "0 \\(padding\\) or 1"),
        ([[1, 1, 1]], r"\[B, T\]"),
    ],
)
def test_malformed_masks(whole, mask, match):
    with pytest.raises(InputError, match=match):
        whole(torch.tensor([[1, 2, 3]]), mask=mask)


def test_cache_of_another_part(config, whole):
    other = FalconPart(config, "0-1")
    with pytest.raises(CacheError, match="new_cache"):
        whole(torch.tensor([[1, 2]]), cache=other.new_cache(1, 4))


def test_bad_cache_sizes(whole):
    with pytest.raises(CacheError, match="max_len"):
        whole.new_cache(1, 0)


def test_spec_out_of_bounds(config):
    from llm_sepweight import PartSpecError

    with pytest.raises(PartSpecError):
        FalconPart(config, "0-3")


def test_reset_cache_starts_over(whole):
    cache = whole.new_cache(2, 6)
    whole(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[0, 1, 1], [1, 1, 1]]), cache)
    cache.reset()
    assert cache.length == 0
    got = whole(torch.tensor([[7, 8]]), cache=cache)
    torch.testing.assert_close(got, whole(torch.tensor([[7, 8]])), atol=1e-6, rtol=0)


def test_part_from_state_dict_checks_keys_and_shapes(config, whole):
    from llm_falcon_model import part_from_state_dict

    state = dict(whole.state_dict())
    shared = part_from_state_dict(config, "f", state)
    assert shared.ln_f.weight.data_ptr() == state["ln_f.weight"].data_ptr()  # no copy
    with pytest.raises(WeightsError, match="missing"):
        part_from_state_dict(config, "f", {k: v for k, v in state.items() if k != "ln_f.bias"})
    with pytest.raises(WeightsError, match="unexpected"):
        part_from_state_dict(config, "0-1", {k: v for k, v in state.items() if "layers.0" in k}
                             | {"ln_f.weight": state["ln_f.weight"]})  # fmt: skip
    state["ln_f.weight"] = torch.ones(3)
    with pytest.raises(WeightsError, match="shape"):
        part_from_state_dict(config, "f", state)


def test_load_part_refuses_another_architecture(tmp_path):
    from llm_falcon_model import load_part
    from llm_sepweight import dump

    dump({"model.norm.weight": torch.ones(2)}, tmp_path, lambda key: ("end", "norm.weight"),
         arch="llama", config={})  # fmt: skip
    with pytest.raises(FalconModelError, match="not 'falcon'"):
        load_part(tmp_path, "e")
