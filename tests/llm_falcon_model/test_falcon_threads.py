"""Packed and unpacked Falcon parts on 1 and several CPU threads against transformers.

On several threads each product of a decode step (and of a short prompt) is cut into one block
per thread (llm_slice_core.products); numerics stay within the parity bound and greedy tokens
stay transformers'. "wide-head" has a vocabulary at least 8 times the hidden size, so its head is
cut into column blocks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from llm_slice_core import attention as grouped_attention
from llm_slice_core import products, thread_splits

_spec = importlib.util.spec_from_file_location(
    "_falcon_parity", Path(__file__).with_name("test_falcon_parity.py")
)
_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parity)

ATOL = 1e-4
STEPS = 12


def wide_head() -> transformers.FalconForCausalLM:
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=1024, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        new_decoder_architecture=True, num_kv_heads=2, bias=True,
    )  # fmt: skip
    model = transformers.FalconForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
    return model


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize(
    "variant_name", ["falcon-7b", "falcon-40b", "falcon-rw-alibi", "sequential-mha-bias", "wide"]
)
def test_decode_on_threads_equals_transformers(variant_name, pack, threads, kit, tmp_path):
    assert thread_splits(2, torch.device("cpu"), torch.float32) == threads
    model = wide_head() if variant_name == "wide" else kit.hf_falcon(variant_name)
    hf_config = model.config.to_dict()
    from llm_falcon_model import decider, load_part
    from llm_sepweight import dump

    dump(model.state_dict(), tmp_path, decider(hf_config), arch="falcon", config=hf_config)
    parts = [load_part(tmp_path, s, pack=pack) for s in kit.SPLIT]
    assert all(p.packs is pack for p in parts)
    assert all(layer.self_attention.qkv.packed is pack for p in parts for layer in p.layers)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = _parity.hf_greedy(model, ids, STEPS)
    caches = [part.new_cache(2, 7 + STEPS) for part in parts]
    got = kit.run_chain(parts, ids, caches=caches)
    torch.testing.assert_close(got, expected[0], atol=ATOL, rtol=0)
    for previous, want in zip(expected[:-1], expected[1:], strict=True):
        token = previous[:, -1:].argmax(-1)
        assert torch.equal(got[:, -1:].argmax(-1), token)
        got = kit.run_chain(parts, token, caches=caches)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("paths", ["kernel", "packed onednn", "unpacked onednn"])
@pytest.mark.parametrize(
    "variant_name", ["falcon-7b", "falcon-40b", "falcon-rw-alibi", "sequential-mha-bias"]
)
def test_decode_on_the_fast_paths_equals_transformers(
    variant_name, paths, threads, kit, tmp_path, monkeypatch, request
):
    """Packed, every product on the decode kernel; or (the kernel off, as without a compiler,
    and unpacked) every product of 2 rows or more (this batch of 2) on oneDNN, however small
    its weight; and every decode step's attention as one product per key/value head."""
    pack = paths != "unpacked onednn"
    if paths != "kernel":
        request.getfixturevalue("without_kernel")
    monkeypatch.setattr(products, "ONEDNN_MIN_WEIGHT", 0)
    monkeypatch.setattr(grouped_attention, "GROUPED_MIN_HEADS", 1)
    test_decode_on_threads_equals_transformers(variant_name, pack, threads, kit, tmp_path)
