import json

import pytest
import torch

from llm_sepweight import ConversionError, convert, dump, load, read_manifest, verify


@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin-sharded"])
def test_hf_layouts_convert_bit_exact(sw, layout, checkpoints, tiny_llama, tmp_path):
    _, state = tiny_llama
    manifest = convert(checkpoints[layout], tmp_path / "out", decider=sw.llama_decider())
    assert manifest.num_layers == sw.NUM_LAYERS
    assert manifest.arch == "llama" and manifest.dtype == "float32"
    assert manifest.config["hidden_size"] == 16
    sw.assert_directory_holds(tmp_path / "out", state)
    verify(tmp_path / "out")


def test_sharded_source_really_has_several_shards(checkpoints):
    index = json.loads((checkpoints["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "fp32"])
def test_dtype_conversion(sw, dtype, checkpoints, tiny_llama, tmp_path):
    _, state = tiny_llama
    decider = sw.llama_decider()
    manifest = convert(checkpoints["single"], tmp_path / "o", decider=decider, dtype=dtype)
    target = {"bfloat16": torch.bfloat16, "float16": torch.float16, "fp32": torch.float32}[dtype]
    assert manifest.dtype == str(target).removeprefix("torch.")
    sw.assert_directory_holds(tmp_path / "o", state, dtype=target)


def test_unknown_dtype_is_refused(sw, checkpoints, tmp_path):
    with pytest.raises(Exception, match="unknown dtype 'int3'"):
        convert(checkpoints["single"], tmp_path / "o", decider=sw.llama_decider(), dtype="int3")
    assert not (tmp_path / "o").exists()


def test_tokenizer_files_are_copied_and_hashed(sw, checkpoints, tmp_path):
    manifest = convert(checkpoints["single"], tmp_path / "o", decider=sw.llama_decider())
    copied = tmp_path / "o" / "tokenizer.json"
    assert copied.read_text() == (checkpoints["single"] / "tokenizer.json").read_text()
    assert "tokenizer.json" in manifest.files and "generation_config.json" in manifest.files


def test_state_dict_source(sw, tiny_llama, tmp_path):
    model, state = tiny_llama
    config = model.config.to_dict()
    manifest = convert(state, tmp_path / "o", decider=sw.llama_decider(), config=config)
    assert manifest.num_layers == sw.NUM_LAYERS
    sw.assert_directory_holds(tmp_path / "o", state)


def test_dump_from_mapping_and_from_iterables(sw, tiny_llama, tmp_path):
    _, state = tiny_llama
    dump(state, tmp_path / "mapping", sw.llama_decider(), arch="llama")
    sw.assert_directory_holds(tmp_path / "mapping", state)
    dump(iter(state.items()), tmp_path / "ordered", sw.llama_decider(), arch="llama")
    sw.assert_directory_holds(tmp_path / "ordered", state)
    shuffled = sorted(state.items(), key=lambda kv: kv[0][::-1])  # layers interleaved
    manifest = dump(shuffled, tmp_path / "shuffled", sw.llama_decider(), arch="llama")
    sw.assert_directory_holds(tmp_path / "shuffled", state)
    assert manifest.num_layers == sw.NUM_LAYERS
    verify(tmp_path / "shuffled")


def test_tied_embeddings_are_stored_in_begin_and_end(tmp_path):
    emb = torch.randn(10, 4)

    def decide(key):
        if key == "embed.weight":
            return [("begin", "embed.weight"), ("end", "head.weight")]
        return ("mid", int(key.split(".")[1]), "w")

    dump({"embed.weight": emb, "layer.0": torch.ones(2)}, tmp_path, decide)
    end_only = load(tmp_path, "e")
    assert torch.equal(end_only.end["head.weight"], emb)
    assert end_only.begin == {}


def test_old_pth_layout(sw, tiny_llama, tmp_path):
    _, state = tiny_llama
    old = tmp_path / "old"
    old.mkdir()
    for name, tensors in sw.expected_layout(state).items():
        torch.save(tensors, old / name.replace(".safetensors", ".pth"))
    manifest = convert(old, tmp_path / "new", arch="llama")
    assert manifest.num_layers == sw.NUM_LAYERS and manifest.arch == "llama"
    sw.assert_directory_holds(tmp_path / "new", state)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_is_not_weights_is_refused(sw, tmp_path):
    import pickle

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ConversionError, match="weights_only"):
        convert(src, tmp_path / "o", decider=sw.llama_decider())
    assert not (tmp_path / "pwned").exists()


def test_missing_layer_is_an_error(sw, tiny_llama, tmp_path):
    _, state = tiny_llama
    holey = {k: v for k, v in state.items() if ".layers.1." not in k}
    with pytest.raises(ConversionError, match=r"layers \[1\]"):
        dump(holey, tmp_path, sw.llama_decider())


def test_config_layer_count_must_match(sw, tiny_llama, tmp_path):
    _, state = tiny_llama
    with pytest.raises(ConversionError, match="config says 5 layers"):
        convert(state, tmp_path / "o", decider=sw.llama_decider(), config={"num_hidden_layers": 5})


def test_clashing_keys_are_an_error(tmp_path):
    with pytest.raises(ConversionError, match="several source keys"):
        dump({"a": torch.ones(1), "b": torch.ones(1)}, tmp_path, lambda k: ("begin", "x"))


def test_bad_placement_is_an_error(tmp_path):
    with pytest.raises(ConversionError, match="bad placement"):
        dump({"a": torch.ones(1)}, tmp_path, lambda k: ("middle", "x"))


def test_source_without_config_needs_a_decider(tiny_llama, tmp_path):
    _, state = tiny_llama
    with pytest.raises(ConversionError, match="model_type"):
        convert(state, tmp_path / "o")


def test_unknown_architecture_names_what_is_installed(checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="no installed model package handles 'nonesuch'"):
        convert(checkpoints["single"], tmp_path / "o", arch="nonesuch")


def test_empty_directory_is_an_error(sw, tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ConversionError, match="no model.safetensors"):
        convert(tmp_path / "src", tmp_path / "o", decider=sw.llama_decider())


def test_architecture_is_found_through_entry_points(sw, tiny_llama, tmp_path, monkeypatch):
    """A model package registered under ``llm_microlibs.models`` is used without being named."""
    _, state = tiny_llama
    site = tmp_path / "site"
    info = site / "fake_llama_pkg-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-llama-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[llm_microlibs.models]\nfakellama = fake_llama_plugin:ARCHITECTURE\n"
    )
    (site / "fake_llama_plugin.py").write_text(
        "from llm_sepweight import Architecture, prefix_decider\n"
        "def decider(config):\n"
        "    base = prefix_decider(r'model\\.layers\\.(\\d+)\\.', begin=('model.',))\n"
        "    def decide(key):\n"
        "        if key in ('model.norm.weight', 'lm_head.weight'):\n"
        "            return ('end', key.removeprefix('model.'))\n"
        "        return base(key)\n"
        "    return decide\n"
        "ARCHITECTURE = Architecture(name='fakellama', model_types=('fake-llama',),\n"
        "                            decider=decider)\n"
    )
    monkeypatch.syspath_prepend(str(site))
    config = {"model_type": "fake-llama", "num_hidden_layers": sw.NUM_LAYERS}
    manifest = convert(state, tmp_path / "o", config=config)
    assert manifest.arch == "fakellama"
    sw.assert_directory_holds(tmp_path / "o", state)
    assert read_manifest(tmp_path / "o").config["model_type"] == "fake-llama"


def test_a_state_dict_is_never_resumed_from_a_stale_journal(sw, tiny_llama, tmp_path):
    """Two different in-memory state dicts written to one directory: the second wins entirely."""
    _, state = tiny_llama
    dump(state, tmp_path, sw.llama_decider())
    (tmp_path / "manifest.json").unlink()  # as if the first run had been killed before the end
    (tmp_path / ".sepweight-progress.json").write_text(
        '{"fingerprint": "", "files": {"begin.safetensors": {"bytes": 1}}}'
    )
    doubled = {k: v * 2 for k, v in state.items()}
    dump(doubled, tmp_path, sw.llama_decider())
    sw.assert_directory_holds(tmp_path, doubled)


def test_converting_into_the_source_directory_keeps_the_source(
    sw, checkpoints, tiny_llama, tmp_path
):
    """Only files named like sepweight's own are ever removed from the output directory."""
    import shutil

    _, state = tiny_llama
    src = tmp_path / "model"
    shutil.copytree(checkpoints["single"], src)
    before = (src / "model.safetensors").read_bytes()
    convert(src, src, decider=sw.llama_decider())
    assert (src / "model.safetensors").read_bytes() == before
    sw.assert_directory_holds(src, state)
    verify(src)
