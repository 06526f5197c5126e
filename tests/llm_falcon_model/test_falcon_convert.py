"""transformers save_pretrained -> llm_sepweight.convert -> load_part gives the source's logits."""

from __future__ import annotations

import pytest
import torch

from llm_falcon_model import ARCHITECTURE, FalconModelError, decider, load_part
from llm_sepweight import ConversionError, convert, find_architecture, load, read_manifest

ATOL = 1e-4


@pytest.mark.parametrize(
    ("variant_name", "save"),
    [
        ("falcon-40b", {}),  # one model.safetensors
        ("falcon-7b", {"max_shard_size": "20KB"}),  # sharded safetensors with an index
        ("falcon-rw-alibi", {"safe_serialization": False}),  # pytorch_model.bin
        ("sequential-mha-bias", {"max_shard_size": "20KB", "safe_serialization": False}),
    ],
)
def test_saved_checkpoint_converts_to_equal_logits(variant_name, save, kit, tmp_path):
    model = kit.hf_falcon(variant_name)
    src, out = tmp_path / "hf", tmp_path / "sepweight"
    model.save_pretrained(src, **save)
    if "max_shard_size" in save:
        assert len(list(src.glob("model-*"))) + len(list(src.glob("pytorch_model-*"))) > 1
    manifest = convert(src, out)  # the decider comes from the "falcon" entry point
    assert manifest.arch == "falcon" and manifest.num_layers == 3

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        want = model(ids).logits
    parts = [load_part(out, spec) for spec in kit.SPLIT]
    caches = [part.new_cache(1, 12) for part in parts]
    torch.testing.assert_close(kit.run_chain(parts, ids, caches=caches), want, atol=ATOL, rtol=0)
    (whole,) = [load_part(out, "f")]
    torch.testing.assert_close(whole(ids), want, atol=ATOL, rtol=0)


def test_tied_head_is_stored_in_end(kit, tmp_path):
    model = kit.hf_falcon("falcon-7b")
    assert model.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "sw")
    end = load(tmp_path / "sw", "e")
    assert end.begin == {} and set(end.end) == {"ln_f.weight", "ln_f.bias", "lm_head.weight"}
    torch.testing.assert_close(end.end["lm_head.weight"], model.lm_head.weight, atol=0, rtol=0)
    (tmp_path / "sw" / "begin.safetensors").unlink()  # an end-only node needs no begin file
    head = load_part(tmp_path / "sw", "e")
    hidden = torch.randn(1, 2, model.config.hidden_size)
    with torch.no_grad():
        want = model.lm_head(model.transformer.ln_f(hidden))
    torch.testing.assert_close(head(hidden), want, atol=ATOL, rtol=0)


def test_untied_head_is_its_own_tensor(kit, tmp_path):
    model = kit.hf_falcon("sequential-mha-bias")
    assert not model.config.tie_word_embeddings
    convert(model.state_dict(), tmp_path, config=model.config.to_dict())
    end = load(tmp_path, "e")
    torch.testing.assert_close(end.end["lm_head.weight"], model.lm_head.weight, atol=0, rtol=0)
    assert not torch.equal(end.end["lm_head.weight"], model.transformer.word_embeddings.weight)


def test_load_part_in_bfloat16_and_manifest_config(kit, tmp_path):
    model = kit.hf_falcon("falcon2-11b")
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "sw", dtype="bfloat16")
    assert read_manifest(tmp_path / "sw").config["num_ln_in_parallel_attn"] == 1
    part = load_part(tmp_path / "sw", "1-3 e")
    assert part.dtype == torch.bfloat16 and len(part.layers) == 2
    assert part(torch.randn(1, 3, model.config.hidden_size)).dtype == torch.float32


def test_entry_point_registration():
    for model_type in ("falcon", "RefinedWeb", "RefinedWebModel"):
        assert find_architecture(model_type=model_type) == ARCHITECTURE
    assert ARCHITECTURE.name == "falcon" and ARCHITECTURE.load_part is load_part


def test_decider_places_hugging_face_names():
    decide = decider({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 2,
                      "num_attention_heads": 2})  # fmt: skip
    assert decide("transformer.h.1.self_attention.query_key_value.weight") == (
        "mid", 1, "self_attention.query_key_value.weight",
    )  # fmt: skip
    assert decide("transformer.word_embeddings.weight") == [
        ("begin", "word_embeddings.weight"), ("end", "lm_head.weight"),
    ]  # fmt: skip
    assert decide("transformer.ln_f.bias") == ("end", "ln_f.bias")
    assert decide("lm_head.weight") is None  # tied: the embedding already went to end
    assert decide("transformer.h.0.self_attention.maybe_rotary.inv_freq") is None
    with pytest.raises(FalconModelError, match="unexpected key"):
        decide("transformer.mystery.weight")


def test_decider_refuses_an_unsupported_config_before_writing(tmp_path):
    config = {"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "model_type": "falcon", "activation": "xielu"}  # fmt: skip
    with pytest.raises(ConversionError, match="activation"):  # naming the package's refusal
        convert({"transformer.ln_f.weight": torch.ones(8)}, tmp_path / "out", config=config)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_part_reads_only_its_own_files(kit, tmp_path):
    model = kit.hf_falcon("falcon-40b")
    convert(model.state_dict(), tmp_path, config=model.config.to_dict())
    for name in ("begin.safetensors", "mid.00000.safetensors", "end.safetensors"):
        (tmp_path / name).unlink()  # a node holding layers 1-2 never needs these
    middle = load_part(tmp_path, "1-3")
    hidden = torch.randn(1, 4, model.config.hidden_size)
    with torch.no_grad():
        positions = torch.arange(4)[None]
        emb = model.transformer.rotary_emb(hidden, positions)
        want = hidden
        for layer in model.transformer.h[1:]:
            want = layer(want, alibi=None, attention_mask=None, position_ids=positions,
                         position_embeddings=emb)[0]  # fmt: skip
    torch.testing.assert_close(middle(hidden), want, atol=ATOL, rtol=0)


def test_whole_part_with_tied_embeddings_keeps_one_copy(kit, tmp_path):
    model = kit.hf_falcon("falcon-7b")
    convert(model.state_dict(), tmp_path, config=model.config.to_dict())
    whole = load_part(tmp_path, "f")
    assert whole.lm_head.weight is whole.word_embeddings.weight
    untied = kit.hf_falcon("sequential-mha-bias")
    convert(untied.state_dict(), tmp_path / "untied", config=untied.config.to_dict())
    whole = load_part(tmp_path / "untied", "f")
    assert whole.lm_head.weight is not whole.word_embeddings.weight
