"""The slice contract, held alike by every model family (docs/architecture.md, "Slice contract").

Each test runs over both families and several tiny configs: a Llama (MHA), a Llama with grouped
KV heads, Falcon-7B-style (multi-query, one norm), Falcon-40B-style (grouped, two norms) and
Falcon-RW-style (ALiBi). A part is always found the way a driver finds it: by the manifest's
architecture name through the entry point.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import transformers

import llm_falcon_model
import llm_llama_model
from llm_sepweight import PartSpecError, dump, find_architecture, load, read_manifest
from llm_sepweight.stfile import map_file, write_file
from llm_slice_core import CacheError, InputError, KVCache, SliceError, WeightsError
from llm_slice_core.packing import groups

VOCAB = 61
CONFIGS = {
    "llama": (
        "llama",
        dict(num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=4),
    ),
    "llama-gqa": (
        "llama",
        dict(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            tie_word_embeddings=True,
        ),
    ),  # fmt: skip
    "falcon-7b": (
        "falcon",
        dict(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
        ),
    ),  # fmt: skip
    "falcon-40b": (
        "falcon",
        dict(
            num_hidden_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
    ),  # fmt: skip
    "falcon-alibi": (
        "falcon",
        dict(
            num_hidden_layers=3,
            hidden_size=48,
            num_attention_heads=6,
            alibi=True,
            multi_query=False,
            parallel_attn=False,
            bias=True,
        ),
    ),  # fmt: skip
}
PACKAGES = {"llama": llm_llama_model, "falcon": llm_falcon_model}
PROMPTS = [[3, 14, 15, 9, 26, 5], [35, 8], [7, 9, 32, 38]]


def hf_model(name: str, seed: int = 0):
    family, options = CONFIGS[name]
    torch.manual_seed(seed)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, **options))
    else:
        model = transformers.FalconForCausalLM(
            transformers.FalconConfig(vocab_size=VOCAB, **options)
        )
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def stored(request, tmp_path_factory) -> tuple[str, Path]:
    """(config name, sepweight directory) of a tiny random model of that config."""
    family, _ = CONFIGS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model = hf_model(request.param)
    hf_config = model.config.to_dict()
    decider = PACKAGES[family].decider(hf_config)
    dump(model.state_dict(), directory, decider, arch=family, config=hf_config)
    return request.param, directory


def load_any(directory: Path, spec: str, **options):
    """A part loaded through the entry point, as a driver that knows no family does."""
    return find_architecture(name=read_manifest(directory).arch).load_part(
        directory, spec, **options
    )


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


def drive(part, x, mask=None, cache=None) -> torch.Tensor:
    """prepare, each layer, complete: what a driver that runs the layers itself does."""
    h, step = part.prepare(x, mask, cache)
    for i, layer in enumerate(part.layers):
        h = layer(h, step, None if cache is None else cache.layers[i])
    return part.complete(h, step, cache)


# -- surface -----------------------------------------------------------------------------------


def parameters(function) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("name", ["load_part", "part_from_state_dict"])
def test_loading_functions_have_one_signature_and_one_module(name):
    llama, falcon = getattr(llm_llama_model, name), getattr(llm_falcon_model, name)
    assert parameters(llama) == parameters(falcon)
    assert llama.__module__.split(".")[1:] == falcon.__module__.split(".")[1:] == ["loading"]
    assert parameters(llama.__wrapped__ if hasattr(llama, "__wrapped__") else llama)[:2] in (
        [("directory", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
         ("spec", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty)],
        [("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
         ("spec", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty)],
    )  # fmt: skip
    for package in PACKAGES.values():
        assert find_architecture(name=package.ARCHITECTURE.name).load_part is package.load_part


@pytest.mark.parametrize(
    "method",
    ["forward", "prepare", "complete", "new_cache", "cache_bytes", "set_layer_weights",
     "drop_layer_weights", "pack"],
)  # fmt: skip
def test_part_methods_have_one_signature(method):
    llama = getattr(llm_llama_model.LlamaPart, method)
    falcon = getattr(llm_falcon_model.FalconPart, method)
    assert parameters(llama) == parameters(falcon)


def test_the_surface_of_a_part(stored):
    _, directory = stored
    part = load_any(directory, "b 0-2")
    assert str(part.spec) == "b 0-2" and part.spec.layers == range(0, 2)
    assert part.dtype == torch.float32 and part.device == torch.device("cpu")
    assert part.config is not None and len(part.layers) == 2
    ids = torch.tensor([[1, 2, 3]])
    grad_on = part.requires_grad_(True)(ids)  # forward runs under no_grad whatever the caller
    assert not grad_on.requires_grad and grad_on.shape[:2] == (1, 3)
    assert load_any(directory, "2-3 e")(grad_on).dtype == torch.float32


# -- forward, layer by layer, cache --------------------------------------------------------------


@pytest.mark.parametrize("pack", [True, False])
def test_prepare_layers_complete_equals_forward_bit_for_bit(stored, pack):
    _, directory = stored
    parts = [load_any(directory, s, pack=pack) for s in ("b 0-1", "1-3 e")]
    ids, mask = left_pad(PROMPTS)
    caches = [[p.new_cache(3, 12) for p in parts] for _ in range(2)]
    x, y = ids, ids
    for step in range(3):
        for part, a, b in zip(parts, *caches, strict=True):
            x, y = part(x, mask, a), drive(part, y, mask, b)
            assert torch.equal(x, y), f"step {step}"
        x = y = x[:, -1:].argmax(-1)
        mask = None
    assert [c.length for c in caches[1]] == [ids.shape[1] + 2] * 2


def allocated(cache: KVCache) -> int:
    """Bytes of every tensor the cache holds."""
    tensors = [t for kv in cache.layers for t in (kv.k, kv.v)]
    tensors += [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in {id(t): t for t in tensors}.values())


@pytest.mark.parametrize(("batch", "max_len"), [(1, 1), (3, 17), (8, 64)])
def test_cache_bytes_equals_what_new_cache_allocates(stored, batch, max_len):
    _, directory = stored
    for spec in ("b", "b 0-1", "1-3 e"):
        part = load_any(directory, spec)
        cache = part.new_cache(batch, max_len)
        assert part.cache_bytes(batch, max_len) == allocated(cache) == cache.nbytes()


@pytest.mark.parametrize("pack", [True, False])
def test_weightless_part_fed_layer_by_layer_equals_the_resident_part(stored, pack):
    _, directory = stored
    resident = load_any(directory, "f", pack=pack)
    streamed = load_any(directory, "f", pack=pack, layers=False)
    files = load(directory, "f")
    assert all(p.is_meta for layer in streamed.layers for p in layer.parameters())
    with pytest.raises(SliceError, match="set_layer_weights"):
        streamed(torch.tensor([[1, 2]]))
    ids, mask = left_pad(PROMPTS)
    want_cache, got_cache = resident.new_cache(3, 10), streamed.new_cache(3, 10)
    for _ in range(2):
        want = resident(ids, mask, want_cache)
        h, step = streamed.prepare(ids, mask, got_cache)
        for i, layer in enumerate(streamed.layers):
            streamed.set_layer_weights(i, files.layers[i])
            h = layer(h, step, got_cache.layers[i])
            streamed.drop_layer_weights(i)
            assert all(p.is_meta for p in layer.parameters())
        got = streamed.complete(h, step, got_cache)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        ids, mask = want[:, -1:].argmax(-1), None
    part = load_any(directory, "1-3", pack=pack, layers=False)  # no begin, no end: no file read
    assert part.device == torch.device("cpu") and part.dtype == torch.float32
    part.set_layer_weights(1, files.layers[2])
    if pack:
        ours = {p.data_ptr() for p in part.layers[1].parameters()}
        assert not ours & {w.data_ptr() for w in files.layers[2].values()}  # packed: a copy


def test_set_layer_weights_assigns_without_a_copy_when_not_packing(stored):
    _, directory = stored
    part = load_any(directory, "0-2", pack=False, layers=False)
    tensors = load(directory, "0-1").layers[0]
    part.set_layer_weights(0, tensors)
    ours = dict(part.layers[0].named_parameters())
    assert all(ours[k].data_ptr() == v.data_ptr() for k, v in tensors.items())
    with pytest.raises(WeightsError, match="missing"):
        part.set_layer_weights(1, dict(list(tensors.items())[1:]))
    with pytest.raises(WeightsError, match="float64"):
        part.set_layer_weights(1, {k: v.double() for k, v in tensors.items()})
    with pytest.raises(IndexError, match="slot 2"):
        part.set_layer_weights(2, tensors)


def test_packed_layer_states_adopted_from_files_equal_the_resident_packed_part(stored, tmp_path):
    """A layer's packed state, written once and mapped back, is adopted with no copy; the part
    then computes bit for bit as the resident packed part (what packed streaming relies on)."""
    _, directory = stored
    resident = load_any(directory, "f")
    streamed = load_any(directory, "f", layers=False)
    files = load(directory, "f")
    for i in range(len(streamed.layers)):
        state = streamed.packed_layer_state(i, files.layers[i])
        assert {k: tuple(v.shape) for k, v in state.items()} == streamed.packed_layer_shapes(i)
        own = resident.packed_layer_state(i)  # the resident pack's own tensors (views)
        assert own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)
        write_file(tmp_path / f"{i}.safetensors", state)
        mapped = map_file(tmp_path / f"{i}.safetensors")
        streamed.set_layer_weights(i, mapped, packed=True)
        ours = {p.data_ptr() for p in streamed.layers[i].parameters()}
        assert {t.data_ptr() for t in mapped.values()} <= ours  # adopted: no copy
    ids, mask = left_pad(PROMPTS)
    caches = [resident.new_cache(3, 10), streamed.new_cache(3, 10)]
    for _ in range(2):
        want, got = resident(ids, mask, caches[0]), streamed(ids, mask, caches[1])
        assert torch.equal(got, want)
        ids, mask = want[:, -1:].argmax(-1), None


def test_set_layer_weights_refuses_a_packed_state_that_does_not_fit(stored):
    _, directory = stored
    part = load_any(directory, "0-2", layers=False)
    state = part.packed_layer_state(0, load(directory, "0-1").layers[0])
    key = next(k for k in state if k.endswith(".weight_t"))
    bad = [
        ({k: v for k, v in state.items() if k != key}, "missing"),
        ({**state, key: state[key][:-1]}, "shape"),
        ({k: v.double() for k, v in state.items()}, "float64"),
        ({**state, key: state[key].t().contiguous().t()}, "contiguous"),
    ]
    last = [k for k in state if k.endswith(".weight_t")][-1]  # refused after other groups
    bad.append(({**state, last: state[last].t().contiguous().t()}, "contiguous"))
    for tensors, message in bad:
        with pytest.raises(WeightsError, match=message):
            part.set_layer_weights(1, tensors, packed=True)
        assert all(p.is_meta for p in part.layers[1].parameters())
        assert not any(g.packed for g in groups(part.layers[1]))  # nothing left adopted
    with pytest.raises(WeightsError, match="holds no weights"):
        part.packed_layer_state(1)


# -- rows leave and join a running batch -----------------------------------------------------------


def greedy_alone(parts, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    caches = [p.new_cache(1, len(prompt) + steps) for p in parts]
    x, tokens, logits = torch.tensor([prompt]), [], []
    for _ in range(steps):
        for part, cache in zip(parts, caches, strict=True):
            x = part(x, cache=cache)
        logits.append(x[0, -1])
        x = x[:, -1:].argmax(-1)
        tokens.append(int(x))
    return tokens, logits


def test_rows_join_a_running_batch_and_leave_it_as_if_each_ran_alone(stored):
    """The HTTP API's shared decode: each request is prefilled in its own 1-row cache, joins
    the batch (right-aligned), decodes with the others, and leaves when done."""
    _, directory = stored
    parts = [load_any(directory, s) for s in ("b 0-1", "1-3 e")]
    steps = 6
    alone = [greedy_alone(parts, p, steps) for p in PROMPTS]
    batch = [p.new_cache(4, 24) for p in parts]
    rows: list[int] = []  # prompt index of each batch row
    tokens: dict[int, list[int]] = {}
    last: dict[int, int] = {}

    def admit(index: int) -> None:
        own = [p.new_cache(1, 24) for p in parts]
        x = torch.tensor([PROMPTS[index]])
        for part, cache in zip(parts, own, strict=True):
            x = part(x, cache=cache)
        torch.testing.assert_close(x[0, -1], alone[index][1][0], atol=1e-5, rtol=0)
        for cache, mine in zip(batch, own, strict=True):
            cache.join(mine)
        last[index] = int(x[0, -1].argmax())
        tokens[index] = [last[index]]
        rows.append(index)

    def decode() -> None:
        x = torch.tensor([[last[i]] for i in rows])
        for part, cache in zip(parts, batch, strict=True):
            x = part(x, cache=cache)
        for row, index in enumerate(rows):
            step = len(tokens[index])
            torch.testing.assert_close(x[row, -1], alone[index][1][step], atol=1e-5, rtol=0)
            last[index] = int(x[row, -1].argmax())
            tokens[index].append(last[index])

    admit(0)
    decode()
    admit(1)  # shorter than the running row: right-aligned, padding slots on its left
    decode()
    decode()
    admit(2)
    decode()
    keep = [r for r, i in enumerate(rows) if i != 0]  # request 0 finishes and leaves
    for cache in batch:
        cache.keep_rows(keep)
    rows[:] = [rows[r] for r in keep]
    while rows:
        decode()
        done = [r for r, i in enumerate(rows) if len(tokens[i]) == steps]
        keep = [r for r in range(len(rows)) if r not in done]
        for cache in batch:
            cache.keep_rows(keep)
        rows[:] = [rows[r] for r in keep]
    for index in (1, 2):
        assert tokens[index] == alone[index][0]
    assert tokens[0] == alone[0][0][: len(tokens[0])]
    assert all(c.rows == 0 and c.length == 0 for c in batch)


def test_join_and_keep_rows_refuse_what_does_not_fit(stored):
    _, directory = stored
    part = load_any(directory, "b 0-1")
    small = part.new_cache(1, 4)
    part(torch.tensor([[1, 2, 3]]), cache=small)
    other = part.new_cache(1, 8)
    part(torch.tensor([[1, 2]]), cache=other)
    full = part.new_cache(1, 8)
    part(torch.tensor([[4]]), cache=full)
    with pytest.raises(CacheError, match="cannot join"):
        full.join(other)  # no free row
    with pytest.raises(CacheError, match="another part"):
        part.new_cache(2, 8).join(load_any(directory, "b 0-2").new_cache(1, 8))
    with pytest.raises(CacheError, match="distinct indices"):
        full.keep_rows([0, 0])
    big = part.new_cache(2, 8)
    big.join(other)
    with pytest.raises(CacheError, match="joined"):
        part(torch.tensor([[5]]), cache=other)
    with pytest.raises(CacheError, match="max_len"):
        part.new_cache(2, 2).join(small)


# -- errors ------------------------------------------------------------------------------------


def test_the_same_bad_input_raises_the_same_error_type(stored):
    name, directory = stored
    family, _ = CONFIGS[name]
    begin, middle = load_any(directory, "b 0-1"), load_any(directory, "1-2")
    hidden = begin.config.hidden_size
    ids = torch.tensor([[1, 2, 3]])
    cases = [
        (PartSpecError, "0-9", lambda: load_any(directory, "0-9")),
        (PartSpecError, "0-x", lambda: load_any(directory, "b 0-x")),
        (InputError, "mask", lambda: begin(ids, mask=torch.ones(1, 3))),
        (InputError, "mask", lambda: begin(ids, mask=torch.tensor([[0, 2, 1]]))),
        (InputError, "mask", lambda: begin(ids, mask=torch.ones(2, 3, dtype=torch.bool))),
        (InputError, "token ids", lambda: begin(torch.tensor([[VOCAB]]))),
        (InputError, "token ids", lambda: begin(torch.zeros(1, 3, hidden))),
        (InputError, "hidden states", lambda: middle(torch.zeros(1, 3, hidden + 1))),
        (InputError, "hidden states", lambda: middle(ids)),
        (InputError, "x is on meta", lambda: begin(ids.to("meta"))),
        (InputError, "x is empty", lambda: middle(torch.zeros(1, 0, hidden))),
        (CacheError, "new_cache", lambda: begin(ids, cache=middle.new_cache(1, 8))),
        (CacheError, "batch_size 1", lambda: begin(ids.repeat(2, 1), cache=begin.new_cache(1, 8))),
        (CacheError, "max_len 2", lambda: begin(ids, cache=begin.new_cache(1, 2))),
        (CacheError, "batch_size >= 1", lambda: begin.new_cache(0, 8)),
        (CacheError, "max_len >= 1", lambda: begin.cache_bytes(1, 0)),
        (WeightsError, "missing", lambda: PACKAGES[family].part_from_state_dict(
            begin.config, "b", {})),
    ]  # fmt: skip
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    other = "falcon" if family == "llama" else "llama"
    with pytest.raises(SliceError, match=f"not '{other}'"):
        PACKAGES[other].load_part(directory, "b")
    cache = begin.new_cache(1, 8)
    with pytest.raises(InputError):
        begin(ids, mask=torch.ones(1, 3), cache=cache)
    assert cache.length == 0 and cache.rows == 0 and not cache.real.any()
