"""Streamed parts (llm_partial_run.streaming): the same logits and tokens as resident parts, with
at most K layers' weights in the process; packed layer files made once, reused, made again when
damaged. Packed files go to a temporary XDG_CACHE_HOME (never the user's cache)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llm_partial_run import packed_layers
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


@pytest.fixture(autouse=True)
def _packed_cache(tmp_path_factory, monkeypatch):
    """Packed layer files made by default go under a temporary cache folder (kept for the
    session, so each model's files are made once), also for the processes tests start."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(params=["tiny_llama", "tiny_falcon"])
def tiny(request):
    return request.getfixturevalue(request.param).directory


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tiny_streamed_logits_and_tokens_equal_resident(tiny, k):
    packed, unpacked = resident(tiny), resident(tiny, pack=False)
    want = {True: steps(packed, *padded()), False: steps(unpacked, *padded())}
    tokens = greedy(packed)
    for pack in (True, False):  # packed layer files (the default) / the model's own files
        for prefetch in (True, False):
            with load_streamed(tiny, resident_layers=k, prefetch=prefetch, pack=pack) as part:
                assert part.packed_files == pack
                assert_same(steps(part, *padded()), want[pack])
                assert greedy(part) == tokens
                assert part.stats.layers == part.stats.calls * 6


def test_the_default_streams_packed_files_from_the_cache_folder(tiny_llama):
    folder = packed_layers.default_packed_dir()
    with load_streamed(tiny_llama.directory, resident_layers=2) as part:
        assert part.packed_files
        assert all(f.path.parent == folder for f in part.files)
        assert_same(steps(part, *padded()), steps(resident(tiny_llama.directory), *padded()))


def test_tiny_streamed_with_a_dtype_change_equals_resident(tiny, tmp_path):
    want = steps(resident(tiny, dtype=torch.float64), *padded())
    with load_streamed(tiny, resident_layers=2, dtype=torch.float64, packed_dir=tmp_path) as part:
        assert part.dtype == torch.float64
        assert_same(steps(part, *padded()), want)
        assert part.stats.bytes["convert"] == 0  # the files were made in float64
        assert all(".float64." in f.path.name for f in part.files)
    want = steps(resident(tiny, pack=False, dtype=torch.float64), *padded())
    with load_streamed(tiny, resident_layers=2, dtype=torch.float64, pack=False) as part:
        assert_same(steps(part, *padded()), want)
        assert part.stats.bytes["convert"] > 0


def test_a_middle_part_streams_in_the_stored_dtype(tiny_llama, tmp_path):
    """A part without begin and end takes the layers' stored dtype (bfloat16 here), as the
    resident part does, and its packed files are made in it."""
    from llm_sepweight import convert

    directory = tmp_path / "bf16"
    convert(tiny_llama.directory.parent / "hf", directory, dtype=torch.bfloat16)
    want = resident(directory, "2-4")
    h = torch.randn(2, 3, want.hidden_size, dtype=torch.bfloat16)
    for pack in (True, False):
        with load_streamed(directory, "2-4", resident_layers=1, pack=pack,
                           packed_dir=tmp_path / "packed") as part:  # fmt: skip
            assert part.dtype == torch.bfloat16 and part.stats.bytes["convert"] == 0
            if pack:
                assert_same([part(h)], [want(h)])
                assert all(".bfloat16." in f.path.name for f in part.files)
            else:
                assert_same([part(h)], [resident(directory, "2-4", pack=False)(h)])


def test_packed_files_are_reused_and_made_again_when_damaged(tiny_llama, tmp_path):
    directory = tiny_llama.directory
    want = steps(resident(directory), *padded())
    with load_streamed(directory, resident_layers=2, packed_dir=tmp_path) as part:
        paths = [f.path for f in part.files]
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # no temporaries left
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    with load_streamed(directory, resident_layers=2, packed_dir=tmp_path) as part:
        assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == stamps  # reused
        assert_same(steps(part, *padded()), want)
    inodes = [p.stat().st_ino for p in paths]  # a file made again is a new file (renamed)
    size = paths[1].stat().st_size
    with open(paths[1], "r+b") as f:
        f.truncate(size - 10)  # truncated
    with open(paths[2], "r+b") as f:
        f.write(b"\xff" * 12)  # a garbled header
    with open(paths[3], "r+b") as f:  # a flipped byte in the data: found with verify=True
        f.seek(size - 100)
        byte = f.read(1)
        f.seek(size - 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with load_streamed(directory, resident_layers=2, packed_dir=tmp_path) as part:
        fresh = [p.stat().st_ino for p in paths]
        assert [a != b for a, b in zip(fresh, inodes, strict=True)] == [0, 1, 1, 0, 0, 0]
    with load_streamed(directory, resident_layers=2, packed_dir=tmp_path, verify=True) as part:
        assert [p.stat().st_ino != fresh[i] for i, p in enumerate(paths)] == [0, 0, 0, 1, 0, 0]
        assert_same(steps(part, *padded()), want)
    assert paths[1].stat().st_size == size


def test_packed_files_that_do_not_fit_the_disk_are_refused_before_writing(
    tiny_llama, tmp_path, monkeypatch
):
    usage = packed_layers.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(packed_layers.shutil, "disk_usage", lambda _: usage._replace(free=10**6))
    with pytest.raises(PartialRunError, match=r"GB free.*--packed-dir.*--no-pack"):
        load_streamed(tiny_llama.directory, resident_layers=2, packed_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(PartialRunError, match="cannot make the packed layer folder"):
        load_streamed(tiny_llama.directory, resident_layers=2, packed_dir=not_a_folder / "x")


def test_all_layers_resident_loads_each_once(tiny):
    with load_streamed(tiny, resident_layers=6) as part:
        assert not part.prefetch
        assert_same(steps(part, *padded()), steps(resident(tiny), *padded()))
        loaded = part.stats.bytes["map"]
        steps(part, *padded())
        assert part.stats.bytes["map"] == loaded == sum(part.layer_bytes())


def test_middle_and_end_parts_chain(tiny_llama):
    directory = tiny_llama.directory
    want = steps(resident(directory), *padded())
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
    want = score_continuations(resident(tiny_llama.directory), prompts, continuations)
    with load_streamed(tiny_llama.directory, resident_layers=2) as part:
        got = score_continuations(part, prompts, continuations)
    assert_scores(got, want)


def test_a_call_failing_half_way_leaves_the_stream_usable(tiny_llama, monkeypatch):
    want = steps(resident(tiny_llama.directory), *padded())
    with load_streamed(tiny_llama.directory, resident_layers=2) as part:
        layer = part.part.layers[3]
        monkeypatch.setattr(layer, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
        with pytest.raises(RuntimeError):
            part(*padded())
        monkeypatch.undo()
        assert_same(steps(part, *padded()), want)  # the loader restarted at layer 0


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_failed_load_raises_and_the_next_call_works(tiny_llama, prefetch):
    want = steps(resident(tiny_llama.directory), *padded())
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


@pytest.fixture(scope="module")
def smollm2_packed_dir(smollm2_sepweight, tmp_path_factory):
    """A folder of SmolLM2's packed layer files, made once for this module."""
    folder = tmp_path_factory.mktemp("smollm2-packed")
    load_streamed(smollm2_sepweight, resident_layers=1, packed_dir=folder).close()
    return folder


SMOL_PROMPTS = [[1, 9690, 28, 1380, 314, 260], [1, 504, 3458]]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_smollm2_streamed_equals_resident(smollm2_sepweight, smollm2_resident, smollm2_packed_dir,
                                          k):  # fmt: skip
    unpacked, packed = smollm2_resident
    want = steps(packed, *padded(SMOL_PROMPTS))
    tokens = greedy(packed, SMOL_PROMPTS, 8)
    for prefetch in (True, False):
        with load_streamed(smollm2_sepweight, resident_layers=k, prefetch=prefetch,
                           packed_dir=smollm2_packed_dir) as part:  # fmt: skip
            assert_same(steps(part, *padded(SMOL_PROMPTS)), want)
            assert greedy(part, SMOL_PROMPTS, 8) == tokens
    with load_streamed(smollm2_sepweight, resident_layers=k, pack=False) as part:
        assert_same(steps(part, *padded(SMOL_PROMPTS)), steps(unpacked, *padded(SMOL_PROMPTS)))
        assert greedy(part, SMOL_PROMPTS, 8) == tokens


def test_smollm2_streamed_scoring_equals_resident(smollm2_sepweight, smollm2_resident,
                                                  smollm2_packed_dir):  # fmt: skip
    _, packed = smollm2_resident
    prompts = [[1, 9690, 28, 1380], [1, 504, 3458], [1, 22]]
    continuations = [[314, 260], [28], [1380, 314, 260, 11]]
    want = score_continuations(packed, prompts, continuations)
    with load_streamed(smollm2_sepweight, resident_layers=2,
                       packed_dir=smollm2_packed_dir) as part:  # fmt: skip
        got = score_continuations(part, prompts, continuations)
    assert_scores(got, want)


_PEAK = textwrap.dedent(
    """
    import sys, torch
    from llm_sepweight import find_architecture, read_manifest
    mode, directory, packed_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    if mode.startswith("streamed"):
        from llm_partial_run.streaming import load_streamed
        part = load_streamed(directory, resident_layers=2, pack=mode == "streamed",
                             packed_dir=packed_dir)
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


def _peak_rss(mode: str, directory: Path, packed_dir: Path) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, mode, str(directory), str(packed_dir)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.split()[-1])


def test_smollm2_k2_peak_rss_below_resident_by_the_layers_not_held(smollm2_sepweight, tmp_path):
    """Peak RSS (VmHWM, which counts the file pages mapped into the process; the page cache
    itself is the kernel's) of a streamed K=2 run vs the resident model, in subprocesses.

    Streamed from packed layer files (the default; made by the first run, in that process:
    the bound holds while they are made too) against the resident packed model (one copy of
    the weights): the drop must be at least the bytes of the 28 layers not held, with no slack.
    Streamed from the model's own files against the unpacked resident model (the same
    products, every layer mapped): the margin is one layer's bytes (allocator and
    page-granularity noise; measured drop: the bound itself).
    """
    with load_streamed(smollm2_sepweight, resident_layers=2, pack=False) as part:
        sizes = part.layer_bytes()
    not_held = sum(sizes) - 2 * max(sizes)
    making = _peak_rss("streamed", smollm2_sepweight, tmp_path)  # makes the packed files
    assert len(list(tmp_path.iterdir())) == len(sizes)
    streamed = _peak_rss("streamed", smollm2_sepweight, tmp_path)
    packed = _peak_rss("packed", smollm2_sepweight, tmp_path)
    assert packed - streamed >= not_held
    assert packed - making >= not_held
    unpacked = _peak_rss("unpacked", smollm2_sepweight, tmp_path)
    assert unpacked - _peak_rss("streamed-unpacked", smollm2_sepweight, tmp_path) >= (
        not_held - max(sizes)
    )


def test_node_serving_resident_layers_gives_the_same_tokens(tiny_llama, node_process, tmp_path):
    from llm_partial_run.session import Pipeline

    directory = tiny_llama.directory
    tokens = []
    streamed = ("--resident-layers", "1", "--packed-dir", str(tmp_path))
    for args in ((), streamed, (*streamed, "--no-pack")):
        nodes = [node_process(directory, "b 0-3", *args), node_process(directory, "3-6 e")]
        with Pipeline([n.address for n in nodes]) as pipeline:
            assert pipeline.chain.links[0].info().resident_layers == (1 if args else None)
            with pipeline.session(len(PROMPTS), 16) as session:
                tokens.append(generate(session, PROMPTS, max_new_tokens=6, cached=True))
        for n in nodes:
            n.stop()
    assert tokens[0] == tokens[1] == tokens[2] == greedy(resident(directory))
    assert len(list(tmp_path.iterdir())) == 3  # layers 0-2, packed once


_WARM = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path

    import torch
    from safetensors.torch import save_file
    from llm_partial_run.packed_layers import map_packed
    from llm_partial_run.weightring import LayerFile

    def rss():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

    path = Path(sys.argv[1])
    save_file({"w": torch.ones(16 << 20)}, path)  # 64 MiB
    layer = LayerFile(path, map_packed(path))
    stopped = threading.Event()
    stopped.set()
    before = rss()
    layer.warm(stopped)
    print(rss() - before)
    layer.warm()
    print(rss() - before)
    layer.populate()
    print(rss() - before)
    """
)


def test_read_ahead_leaves_the_layer_out_of_the_process(tmp_path):
    """``LayerFile.warm`` (K = 1's read-ahead) reads a layer into the page cache through its
    map without keeping it in the process: the resident set grows by at most a few MiB (one
    2 MiB chunk at a time), while mapping the layer for real grows it by the layer."""
    out = subprocess.run([sys.executable, "-c", _WARM, str(tmp_path / "layer.safetensors")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    stopped, warmed, populated = map(int, out.stdout.split())
    assert stopped < 4 << 20 and warmed < 8 << 20
    assert populated > 60 << 20


def test_the_stored_dtype_is_the_one_holding_most_bytes(tmp_path):
    """A bfloat16 layer with float32 norms is bfloat16 (its file lists the float32 ones first)."""
    from llm_partial_run.streaming import _stored_dtype
    from llm_sepweight.stfile import write_file

    path = tmp_path / "mid.safetensors"
    write_file(path, {"w": torch.ones(64, 64, dtype=torch.bfloat16), "norm": torch.ones(64)})
    assert _stored_dtype(path) == torch.bfloat16
