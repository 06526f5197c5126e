"""FalconConfig.from_hf: each variant resolved as transformers runs it; the rest refused by name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from llm_falcon_model import FalconConfig, FalconModelError

# The real configs' shapes (from the published config.json files), written out here.
FALCON_7B = dict(
    model_type="falcon", vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
    num_attention_heads=71, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
    alibi=False, bias=False,
)  # fmt: skip
FALCON_40B = dict(
    model_type="falcon", vocab_size=65024, hidden_size=8192, num_hidden_layers=60,
    num_attention_heads=128, num_kv_heads=8, new_decoder_architecture=True, parallel_attn=True,
    alibi=False, bias=False,
)  # fmt: skip
FALCON_180B = dict(FALCON_40B, hidden_size=14848, num_hidden_layers=80, num_attention_heads=232)
FALCON2_11B = dict(
    model_type="falcon", vocab_size=65024, hidden_size=4096, num_hidden_layers=60,
    num_attention_heads=32, num_kv_heads=8, new_decoder_architecture=True,
    num_ln_in_parallel_attn=1, ffn_hidden_size=16384, rope_theta=500042.0,
)  # fmt: skip
FALCON_RW_1B = dict(
    model_type="falcon", vocab_size=50304, hidden_size=2048, num_hidden_layers=24,
    num_attention_heads=32, alibi=True, bias=True, multi_query=False, parallel_attn=False,
)  # fmt: skip


@pytest.mark.parametrize(
    ("hf", "layout", "block", "kv_heads"),
    [
        (FALCON_7B, "multi_query", "parallel", 1),
        (FALCON_40B, "grouped", "parallel_two_norms", 8),
        (FALCON_180B, "grouped", "parallel_two_norms", 8),
        (FALCON2_11B, "grouped", "parallel", 8),
        (FALCON_RW_1B, "per_head", "sequential", 32),
    ],
)
def test_real_variants_resolve(hf, layout, block, kv_heads):
    config = FalconConfig.from_hf(hf)
    assert (config.qkv_layout, config.block, config.num_kv_heads) == (layout, block, kv_heads)
    assert config.head_dim == (128 if hf is FALCON2_11B else 64)
    assert config.ffn_hidden_size == hf.get("ffn_hidden_size", 4 * hf["hidden_size"])


def test_kv_bytes_per_token_uses_kv_heads():
    # 2 (K and V) x layers x kv_heads x head_dim x bytes
    assert FalconConfig.from_hf(FALCON_7B).kv_bytes_per_token(2) == 2 * 32 * 1 * 64 * 2
    assert FalconConfig.from_hf(FALCON_40B).kv_bytes_per_token(2) == 2 * 60 * 8 * 64 * 2


def test_rope_fields():
    assert FalconConfig.from_hf(FALCON2_11B).rope_theta == 500042.0
    scaled = FalconConfig.from_hf(dict(FALCON_7B, rope_scaling={"type": "linear", "factor": 4.0}))
    assert scaled.rope_linear_factor == 4.0
    new_style = dict(
        FALCON_7B, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 7.0}
    )
    assert (
        FalconConfig.from_hf(new_style).rope_theta,
        FalconConfig.from_hf(new_style).rope_linear_factor,
    ) == (7.0, 2.0)


def test_legacy_refinedweb_configs():
    rw40 = dict(model_type="RefinedWeb", vocab_size=65024, hidden_size=8192, n_head=128,
                n_head_kv=8, n_layer=60, parallel_attn=True)  # fmt: skip
    config = FalconConfig.from_hf(rw40)
    assert (config.qkv_layout, config.num_kv_heads, config.num_layers) == ("grouped", 8, 60)
    rw7 = dict(model_type="RefinedWebModel", vocab_size=65024, hidden_size=4544, n_head=71,
               n_layer=32, multi_query=True, parallel_attn=True)  # fmt: skip
    assert FalconConfig.from_hf(rw7).qkv_layout == "multi_query"


def test_from_a_saved_config_json(tmp_path):
    hf_config = transformers.FalconConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, new_decoder_architecture=True,
                                          num_kv_heads=1)  # fmt: skip
    hf_config.save_pretrained(tmp_path)
    from_dir = FalconConfig.from_hf(tmp_path)
    assert from_dir == FalconConfig.from_hf(tmp_path / "config.json")
    assert from_dir == FalconConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (from_dir.num_layers, from_dir.num_kv_heads) == (2, 1)


def test_config_is_frozen():
    config = FalconConfig.from_hf(FALCON_7B)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 3  # type: ignore[misc]


TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(new_decoder_architecture=True, parallel_attn=False), "parallel_attn"),
        (dict(new_decoder_architecture=True, num_ln_in_parallel_attn=3), "num_ln_in_parallel_attn"),
        (dict(num_ln_in_parallel_attn=2), "num_ln_in_parallel_attn"),
        (dict(new_decoder_architecture=True, num_kv_heads=3), "num_kv_heads"),
        (dict(multi_query=False, num_kv_heads=2), "num_kv_heads"),
        (dict(activation="xielu"), "activation"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_parameters"),
        (dict(hidden_size=18), "hidden_size"),
        (dict(model_type="llama"), "model_type"),
        (dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(layer_norm_epsilon=None), "layer_norm_epsilon"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(changes, field):
    with pytest.raises(FalconModelError, match=field):
        FalconConfig.from_hf({**TINY, **changes})


def test_missing_field_is_named():
    with pytest.raises(FalconModelError, match="num_hidden_layers"):
        FalconConfig.from_hf({"vocab_size": 5, "hidden_size": 8, "num_attention_heads": 2})


@pytest.mark.parametrize(
    "changes",
    [
        dict(new_decoder_architecture=True, parallel_attn=False),
        dict(num_ln_in_parallel_attn=2),
        dict(multi_query=False, num_kv_heads=2),
    ],
)
def test_refused_configs_do_not_run_in_transformers_either(changes):
    model = transformers.FalconForCausalLM(transformers.FalconConfig(**TINY, **changes))
    with pytest.raises((AttributeError, RuntimeError, UnboundLocalError)):
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(qkv_layout="multi_query", num_kv_heads=2), "num_kv_heads"),
        (dict(qkv_layout="per_head", num_kv_heads=2), "num_kv_heads"),
        (dict(qkv_layout="fused"), "qkv_layout"),
        (dict(block="parallel_three_norms"), "block"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_direct_construction_is_validated(changes, field):
    valid = FalconConfig.from_hf(TINY)
    with pytest.raises(FalconModelError, match=field):
        dataclasses.replace(valid, **changes)
