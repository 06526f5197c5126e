"""Streamed parts (llm_partial_run.streaming): the same logits and tokens as resident parts, with
at most K layers' weights in the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llm_partial_run.errors import PartialRunError
from llm_partial_run.streaming import StreamedPart, load_streamed
from llm_sampler import generate, score_continuations
from llm_sepweight import find_architecture, read_manifest

PROMPTS = [[5, 17, 3, 42, 8, 11], [9, 2, 30]]  # different lengths: left padding in a batch


def resident(directory: Path, spec: str = "f", **kwargs):
    """The part loaded whole by its model package (the reference)."""
    return find_architecture(name=read_manifest(directory).arch).load_part(
        directory, spec, **kwargs
    )


def greedy(part, prompts=PROMPTS, new: int = 6) -> list[list[int]]:
    """Greedy tokens from ``part`` as a cached forward function of llm_sampler."""
    cache = part.new_cache(len(prompts), max(map(len, prompts)) + new)
    return generate(lambda ids, mask: part(ids, mask, cache), prompts, max_new_tokens=new,
                    cached=True)  # fmt: skip


def steps(part, batch: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a padded prefill and two cached decode steps."""
    cache = part.new_cache(batch.shape[0], batch.shape[1] + 2)
    out = [part(batch, mask, cache)]
    for token in (7, 13):
        ids = torch.full((batch.shape[0], 1), token)
        out.append(part(ids, None, cache))
    return out


def padded(prompts=PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def assert_scores(got, want) -> None:
    assert torch.equal(got.mask, want.mask)
    assert_same([got.token_logprobs, got.total], [want.token_logprobs, want.total])


@pytest.fixture(params=["tiny_llama", "tiny_falcon"])
def tiny(request):
    return request.getfixturevalue(request.param).directory


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tiny_streamed_logits_and_tokens_equal_resident(tiny, k):
    ref = resident(tiny, pack=False)  # the same products as the streamed layers (unpacked)
    want = steps(ref, *padded())
    tokens = greedy(resident(tiny))  # the default (packed) resident part's tokens
    for prefetch in (True, False):
        with load_streamed(tiny, resident_layers=k, prefetch=prefetch) as part:
            assert_same(steps(part, *padded()), want)
            assert greedy(part) == tokens
            assert part.stats.layers == part.stats.calls * 6


def test_tiny_streamed_packed_equals_packed_resident(tiny):
    want = steps(resident(tiny), *padded())
    with load_streamed(tiny, resident_layers=2, pack=True) as part:
        assert_same(steps(part, *padded()), want)


def test_tiny_streamed_with_a_dtype_change_equals_resident(tiny):
    want = steps(resident(tiny, pack=False, dtype=torch.float64), *padded())
    with load_streamed(tiny, resident_layers=2, dtype=torch.float64) as part:
        assert part.dtype == torch.float64
        assert_same(steps(part, *padded()), want)
        assert part.stats.bytes["convert"] > 0


def test_all_layers_resident_loads_each_once(tiny):
    with load_streamed(tiny, resident_layers=6) as part:
        assert not part.prefetch
        assert_same(steps(part, *padded()), steps(resident(tiny, pack=False), *padded()))
        loaded = part.stats.bytes["map"]
        steps(part, *padded())
        assert part.stats.bytes["map"] == loaded == sum(part.layer_bytes())


def test_middle_and_end_parts_chain(tiny_llama):
    directory = tiny_llama.directory
    want = steps(resident(directory, pack=False), *padded())
    parts = [load_streamed(directory, spec, resident_layers=1) for spec in tiny_llama.specs]

    class Chain:
        def new_cache(self, b, n):
            return [p.new_cache(b, n) for p in parts]

        def __call__(self, ids, mask, caches):
            h = ids
            for p, c in zip(parts, caches, strict=True):
                h = p(h, mask, c)
            return h

    assert_same(steps(Chain(), *padded()), want)
    assert [str(p.spec) for p in parts] == list(tiny_llama.specs)
    assert parts[1].device == torch.device("cpu") and parts[1].dtype == torch.float32
    for p in parts:
        p.close()


def test_surface_of_a_part(tiny_llama):
    ref = resident(tiny_llama.directory)
    with load_streamed(tiny_llama.directory, "b 0-4", resident_layers=2) as part:
        assert isinstance(part, StreamedPart)
        assert str(part.spec) == "b 0-4" and part.resident_layers == 2
        assert part.config == ref.config and part.dtype == ref.dtype
        assert part.cache_bytes(3, 10) == resident(tiny_llama.directory, "b 0-4").cache_bytes(3, 10)
        assert len(part.layer_bytes()) == 4


def test_scoring_equals_resident(tiny_llama):
    prompts = [[5, 6, 7], [8, 9], [1]]
    continuations = [[10, 11], [12], [13, 14, 15]]
    want = score_continuations(resident(tiny_llama.directory, pack=False), prompts, continuations)
    with load_streamed(tiny_llama.directory, resident_layers=2) as part:
        got = score_continuations(part, prompts, continuations)
    assert_scores(got, want)


def test_a_call_failing_half_way_leaves_the_stream_usable(tiny_llama, monkeypatch):
    want = steps(resident(tiny_llama.directory, pack=False), *padded())
    with load_streamed(tiny_llama.directory, resident_layers=2) as part:
        layer = part.part.layers[3]
        monkeypatch.setattr(layer, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
        with pytest.raises(RuntimeError):
            part(*padded())
        monkeypatch.undo()
        assert_same(steps(part, *padded()), want)  # the loader restarted at layer 0


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_failed_load_raises_and_the_next_call_works(tiny_llama, prefetch):
    want = steps(resident(tiny_llama.directory, pack=False), *padded())
    with load_streamed(tiny_llama.directory, resident_layers=2, prefetch=prefetch) as part:
        path = part._stream.path
        load = path.load
        failed = []

        def flaky(index):
            if index == 3 and not failed:
                failed.append(index)
                raise OSError("disk on fire")
            return load(index)

        path.load = flaky
        with pytest.raises((PartialRunError, OSError), match="disk on fire"):
            part(*padded())
        assert_same(steps(part, *padded()), want)


def test_stats_count_every_layer_once_per_call(tiny_llama):
    with load_streamed(tiny_llama.directory, resident_layers=2) as part:
        steps(part, *padded())
        stats = part.stats
        assert stats.calls == 3 and stats.layers == 18
        layer = part.layer_bytes()[0]  # (all six are the same size)
        # each layer once per call, plus up to K = 2 loaded ahead for the next call
        assert 18 * layer <= stats.bytes["map"] <= 20 * layer
        assert 0.0 <= stats.hidden_fraction <= 1.0
        assert "GB/s" in stats.report()
        stats.reset()
        assert stats.calls == 0 and stats.bytes["map"] == 0


def test_closed_part_refuses_calls(tiny_llama):
    part = load_streamed(tiny_llama.directory, resident_layers=2)
    part.close()
    with pytest.raises(PartialRunError, match="closed"):
        part(*padded())


@pytest.mark.parametrize("bad", [0, -1, 1.5, None])
def test_bad_resident_layers_is_refused(tiny_llama, bad):
    with pytest.raises(PartialRunError, match="resident_layers"):
        load_streamed(tiny_llama.directory, resident_layers=bad)


def test_local_model_streams(tiny_llama):
    from llm_partial_run.session import LocalModel

    directory = tiny_llama.directory
    want = greedy(resident(directory))
    for specs in (("f",), tiny_llama.specs):
        model = LocalModel(directory, specs=specs, resident_layers=2)
        with model.session(len(PROMPTS), 16) as session:
            got = generate(session, PROMPTS, max_new_tokens=6, cached=True)
        assert got == want


# ---- the real SmolLM2 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_resident(smollm2_sepweight):
    return resident(smollm2_sepweight, pack=False), resident(smollm2_sepweight)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_smollm2_streamed_equals_resident(smollm2_sepweight, smollm2_resident, k):
    unpacked, packed = smollm2_resident
    prompts = [[1, 9690, 28, 1380, 314, 260], [1, 504, 3458]]
    with load_streamed(smollm2_sepweight, resident_layers=k) as part:
        assert_same(steps(part, *padded(prompts)), steps(unpacked, *padded(prompts)))
        assert greedy(part, prompts, 8) == greedy(packed, prompts, 8)


def test_smollm2_streamed_scoring_equals_resident(smollm2_sepweight, smollm2_resident):
    unpacked, _ = smollm2_resident
    prompts = [[1, 9690, 28, 1380], [1, 504, 3458], [1, 22]]
    continuations = [[314, 260], [28], [1380, 314, 260, 11]]
    want = score_continuations(unpacked, prompts, continuations)
    with load_streamed(smollm2_sepweight, resident_layers=2) as part:
        got = score_continuations(part, prompts, continuations)
    assert_scores(got, want)


_PEAK = textwrap.dedent(
    """
    import sys, torch
    from llm_sepweight import find_architecture, read_manifest
    mode, directory = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "streamed":
        from llm_partial_run.streaming import load_streamed
        part = load_streamed(directory, resident_layers=2)
    else:
        load_part = find_architecture(name=read_manifest(directory).arch).load_part
        part = load_part(directory, "f", pack=mode == "packed")
    cache = part.new_cache(1, 16)
    part(torch.tensor([[1, 9690, 28, 1380, 314, 260]]), None, cache)
    for _ in range(3):
        part(torch.tensor([[260]]), None, cache)
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork and exec)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    print(int(status.split()[0]) * 1024)
    """
)


def _peak_rss(mode: str, directory: Path) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, mode, str(directory)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


def test_smollm2_k2_peak_rss_below_resident_by_the_layers_not_held(smollm2_sepweight):
    """Peak RSS (VmHWM, which counts the file pages mapped into the process; the page cache
    itself is the kernel's) of a streamed K=2 run vs the resident model, in subprocesses.

    Against the default resident model (packed: one copy of the weights) the drop must be at
    least the bytes of the 28 layers not held, with no slack (measured: ~97 MB to spare).
    Against the unpacked resident model (the same products, every layer mapped) the margin is
    one layer's bytes (allocator and page-granularity noise; measured drop: the bound itself).
    """
    with load_streamed(smollm2_sepweight, resident_layers=2) as part:
        sizes = part.layer_bytes()
    not_held = sum(sizes) - 2 * max(sizes)
    streamed = _peak_rss("streamed", smollm2_sepweight)
    assert _peak_rss("packed", smollm2_sepweight) - streamed >= not_held
    assert _peak_rss("unpacked", smollm2_sepweight) - streamed >= not_held - max(sizes)


def test_node_serving_resident_layers_gives_the_same_tokens(tiny_llama, node_process):
    from llm_partial_run.session import Pipeline

    directory = tiny_llama.directory
    tokens = []
    for args in ((), ("--resident-layers", "1")):
        nodes = [node_process(directory, "b 0-3", *args), node_process(directory, "3-6 e")]
        with Pipeline([n.address for n in nodes]) as pipeline:
            assert pipeline.chain.links[0].info().resident_layers == (1 if args else None)
            with pipeline.session(len(PROMPTS), 16) as session:
                tokens.append(generate(session, PROMPTS, max_new_tokens=6, cached=True))
        for n in nodes:
            n.stop()
    assert tokens[0] == tokens[1] == greedy(resident(directory))
