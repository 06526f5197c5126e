"""Weight placement: HF decider, GGUF names and q/k permutation, and llm_sepweight.convert."""

from __future__ import annotations

import pytest
import torch
import transformers

from llm_llama_model import (
    ARCHITECTURE,
    LlamaConfig,
    LlamaModelError,
    config_from_gguf,
    decider,
    gguf_rename,
    gguf_transform,
    load_part,
)
from llm_sepweight import convert, files, find_architecture

HF = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=2, model_type="llama")  # fmt: skip


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows: each head's two halves become interleaved
    pairs (written here from its definition, to check that gguf_transform undoes it)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def test_decider_places_hf_keys():
    decide = decider(HF)
    assert decide("model.embed_tokens.weight") == ("begin", "embed_tokens.weight")
    assert decide("model.layers.2.self_attn.k_proj.bias") == ("mid", 2, "self_attn.k_proj.bias")
    assert decide("model.layers.0.post_attention_layernorm.weight") == (
        "mid", 0, "post_attention_layernorm.weight")  # fmt: skip
    assert decide("model.norm.weight") == ("end", "norm.weight")
    assert decide("lm_head.weight") == ("end", "lm_head.weight")
    assert decide("model.layers.1.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(LlamaModelError, match="model.layers.1.attn.c_attn.weight"):
        decide("model.layers.1.attn.c_attn.weight")


def test_tied_decider_stores_the_embeddings_twice_and_skips_lm_head():
    decide = decider(dict(HF, tie_word_embeddings=True))
    assert decide("model.embed_tokens.weight") == [
        ("begin", "embed_tokens.weight"), ("end", "lm_head.weight")]  # fmt: skip
    assert decide("lm_head.weight") is None


def test_gguf_names():
    assert gguf_rename("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_rename("output.weight") == "lm_head.weight"
    assert gguf_rename("output_norm.weight") == "model.norm.weight"
    assert gguf_rename("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert gguf_rename("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_rename("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert gguf_rename("rope_freqs.weight") is None
    with pytest.raises(LlamaModelError, match="blk.0.ssm_conv1d.weight"):
        gguf_rename("blk.0.ssm_conv1d.weight")


@pytest.mark.parametrize("suffix", ["weight", "bias"])
def test_gguf_transform_undoes_the_llama_cpp_permutation(suffix):
    q = torch.randn(4 * 8, 32) if suffix == "weight" else torch.randn(4 * 8)
    k = torch.randn(2 * 8, 32) if suffix == "weight" else torch.randn(2 * 8)
    q_name, k_name = (f"model.layers.0.self_attn.{p}_proj.{suffix}" for p in "qk")
    assert torch.equal(gguf_transform(q_name, llama_cpp_permute(q, 4), HF), q)
    assert torch.equal(gguf_transform(k_name, llama_cpp_permute(k, 2), HF), k)
    v = torch.randn(16, 32)
    assert gguf_transform("model.layers.0.self_attn.v_proj.weight", v, HF) is v


def test_config_from_gguf_metadata():
    meta = {"general.architecture": "llama", "llama.block_count": 30,
            "llama.context_length": 8192, "llama.embedding_length": 576,
            "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 49152,
            "llama.rope.dimension_count": 64}  # fmt: skip
    config = LlamaConfig.from_hf(config_from_gguf(meta))
    assert (config.num_hidden_layers, config.head_dim, config.num_key_value_heads) == (30, 64, 3)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings
    scaled = config_from_gguf({**meta, "llama.rope.scaling.type": "linear",
                               "llama.rope.scaling.factor": 4.0})  # fmt: skip
    assert LlamaConfig.from_hf(scaled).rope_scaling.factor == 4.0
    with pytest.raises(LlamaModelError, match="yarn"):
        config_from_gguf({**meta, "llama.rope.scaling.type": "yarn"})
    with pytest.raises(LlamaModelError, match="llama.block_count"):
        config_from_gguf({k: v for k, v in meta.items() if k != "llama.block_count"})


def test_config_from_gguf_reads_tying_and_vocabulary_from_the_file_facts():
    meta = {"general.architecture": "llama", "llama.block_count": 2,
            "llama.embedding_length": 64, "llama.feed_forward_length": 128,
            "llama.attention.head_count": 4}  # fmt: skip
    names = ["token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"]
    facts = {"sepweight.tensor_names": names, "sepweight.vocab_size": 321}
    tied = config_from_gguf({**meta, **facts})
    assert tied["tie_word_embeddings"] and tied["vocab_size"] == 321
    facts["sepweight.tensor_names"] = [*names, "output.weight"]
    assert not config_from_gguf({**meta, **facts})["tie_word_embeddings"]
    assert config_from_gguf({**meta, **facts, "llama.vocab_size": 500})["vocab_size"] == 500
    with pytest.raises(LlamaModelError, match="llama.vocab_size"):
        config_from_gguf(meta)


def test_registered_for_llama_and_mistral():
    assert find_architecture(model_type="llama") is ARCHITECTURE
    assert find_architecture(model_type="mistral") is ARCHITECTURE
    assert find_architecture(gguf="llama") is ARCHITECTURE


@pytest.mark.parametrize("tied", [False, True])
def test_convert_a_saved_hf_model_then_load_parts(tmp_path, tied):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in HF.items() if k != "model_type"}
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**kwargs, tie_word_embeddings=tied)
    ).eval()
    model.save_pretrained(tmp_path / "hf")
    manifest = convert(tmp_path / "hf", tmp_path / "sw")
    assert manifest.arch == "llama" and manifest.num_layers == 3
    end_files = [p.name for p in files(tmp_path / "sw", "2-3 e")]
    assert "begin.safetensors" not in end_files and "mid.00001.safetensors" not in end_files
    ids = torch.randint(0, 64, (2, 5))
    parts = [load_part(tmp_path / "sw", s) for s in ("b 0-2", "2-3 e")]
    whole = load_part(tmp_path / "sw", "f")
    assert (whole.lm_head.weight is whole.embed_tokens.weight) == tied
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(parts[1](parts[0](ids)), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(whole(ids), expected, atol=1e-4, rtol=0)
    assert load_part(tmp_path / "sw", "b", dtype=torch.bfloat16).dtype == torch.bfloat16
