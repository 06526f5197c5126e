"""Bad inputs raise llm_slice_core's shared errors (InputError, CacheError, WeightsError; a bad
spec PartSpecError) with a clear message, before the cache is touched."""

from __future__ import annotations

import pytest
import torch

from llm_llama_model import LlamaConfig, LlamaPart, part_from_state_dict
from llm_sepweight import PartSpecError
from llm_slice_core import CacheError, InputError, WeightsError

CONFIG = LlamaConfig.from_hf(
    dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
)


def random_part(spec: str) -> LlamaPart:
    torch.manual_seed(0)
    shapes = LlamaPart(CONFIG, spec, device="meta").state_dict()
    return part_from_state_dict(CONFIG, spec, {k: torch.randn(v.shape) for k, v in shapes.items()})


@pytest.fixture
def begin():
    return random_part("b 0-2")


@pytest.fixture
def middle():
    return random_part("2-4")


@pytest.mark.parametrize("ids", [[[0, 32]], [[-1, 3]]])
def test_ids_outside_the_vocabulary(begin, ids):
    with pytest.raises(InputError, match=r"\[0, 32\)"):
        begin(torch.tensor(ids))


@pytest.mark.parametrize("x", [torch.zeros(1, 3), torch.zeros(3, dtype=torch.long),
                               torch.zeros(1, 0, dtype=torch.long)])  # fmt: skip
def test_ids_of_the_wrong_kind(begin, x):
    with pytest.raises(InputError, match="token ids|empty"):
        begin(x)


@pytest.mark.parametrize("x", [torch.zeros(1, 3, 15), torch.zeros(1, 3, dtype=torch.long),
                               torch.zeros(3, 16)])  # fmt: skip
def test_hidden_of_the_wrong_width_or_kind(middle, x):
    with pytest.raises(InputError, match=r"hidden states \[B, T, 16\]"):
        middle(x)


def test_batch_larger_than_the_cache(begin):
    cache = begin.new_cache(2, 8)
    with pytest.raises(CacheError, match="3 rows is larger than the cache's batch_size 2"):
        begin(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    begin(torch.zeros(1, 2, dtype=torch.long), cache=cache)  # fewer rows are fine
    assert cache.length == 2


def test_sequence_longer_than_max_len(begin):
    cache = begin.new_cache(1, 4)
    with pytest.raises(CacheError, match="exceed the cache's max_len 4"):
        begin(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    begin(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(CacheError, match="4 cached \\+ 1 new"):
        begin(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.length == 4


@pytest.mark.parametrize("mask", [torch.ones(1, 2), torch.ones(2, 3), torch.tensor([[2, 1, 1]]),
                                  [[1, 1, 1]]])  # fmt: skip
def test_malformed_mask(begin, mask):
    cache = begin.new_cache(1, 8)
    with pytest.raises(InputError, match="mask"):
        begin(torch.zeros(1, 3, dtype=torch.long), mask=mask, cache=cache)
    assert cache.length == 0 and not cache.real.any()


def test_cache_of_another_part(begin, middle):
    with pytest.raises(CacheError, match="new_cache"):
        middle(torch.zeros(1, 1, 16), cache=random_part("1-4").new_cache(1, 4))


def test_spec_outside_the_model_and_weights_that_do_not_fit():
    with pytest.raises(PartSpecError, match="4 layers"):
        LlamaPart(CONFIG, "2-6", device="meta")
    with pytest.raises(WeightsError, match="missing"):
        part_from_state_dict(CONFIG, "b", {})
    with pytest.raises(WeightsError, match="shape"):
        part_from_state_dict(CONFIG, "b", {"embed_tokens.weight": torch.zeros(32, 15)})


def test_bad_cache_sizes(begin):
    with pytest.raises(CacheError, match=">= 1"):
        begin.new_cache(0, 4)


def test_input_on_another_device(begin):
    with pytest.raises(InputError, match="meta"):
        begin(torch.zeros(1, 2, dtype=torch.long, device="meta"))
