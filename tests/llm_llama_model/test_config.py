"""LlamaConfig.from_hf: the layouts it reads and the configs it refuses, naming the field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llm_llama_model import LlamaConfig, LlamaModelError, LlamaPart, RopeScaling
from llm_slice_core import CacheError, InputError

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def test_dict_file_and_folder_give_the_same_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    config = LlamaConfig.from_hf(TINY)
    assert LlamaConfig.from_hf(tmp_path) == config == LlamaConfig.from_hf(tmp_path / "config.json")
    assert (config.head_dim, config.kv_groups, config.rope_scaling) == (4, 2, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 8


def test_explicit_head_dim_and_defaults():
    config = LlamaConfig.from_hf(dict(TINY, head_dim=6, num_key_value_heads=None))
    assert config.head_dim == 6 and config.num_key_value_heads == 4
    assert not config.tie_word_embeddings and config.sliding_window is None


def test_old_and_new_rope_layouts_agree():
    old = dict(
        TINY,
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    new = dict(
        TINY,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    assert LlamaConfig.from_hf(old) == LlamaConfig.from_hf(new)
    assert LlamaConfig.from_hf(new).rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    linear = LlamaConfig.from_hf(dict(TINY, rope_scaling={"rope_type": "linear", "factor": 2}))
    assert linear.rope_scaling == RopeScaling("linear", 2.0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"model_type": "falcon"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": None}, "vocab_size"),
        ({"head_dim": 5}, "head_dim"),
    ],
)
def test_unrunnable_configs_are_refused_naming_the_field(change, field):
    with pytest.raises(LlamaModelError, match=field):
        LlamaConfig.from_hf(dict(TINY, **change))


def test_missing_field_and_unreadable_file(tmp_path):
    with pytest.raises(LlamaModelError, match="intermediate_size"):
        LlamaConfig.from_hf({k: v for k, v in TINY.items() if k != "intermediate_size"})
    with pytest.raises(LlamaModelError, match="cannot read"):
        LlamaConfig.from_hf(tmp_path)


def test_mistral_sliding_window_is_refused_beyond_the_window():
    config = LlamaConfig.from_hf(dict(TINY, model_type="mistral", sliding_window=8))
    assert LlamaConfig.from_hf(dict(TINY, model_type="mistral")).sliding_window == 4096
    part = LlamaPart(config, "f")
    part.new_cache(1, 8)
    with pytest.raises(CacheError, match="sliding_window 8"):
        part.new_cache(1, 9)
    import torch

    with pytest.raises(InputError, match="sliding_window"):
        part(torch.zeros(1, 9, dtype=torch.long))
