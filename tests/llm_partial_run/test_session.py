"""Sessions in one process: LocalModel / LocalLink, no sockets.

The same greedy tokens as transformers (batch 1 and a left-padded batch) for a tiny Llama and a
tiny Falcon; the session rules (steps, caps, TTL) that a node applies too; keep_rows / join
passed to the cache; an uncached session scores like transformers.
"""

from __future__ import annotations

import threading

import pytest
import torch

import llm_sampler
from llm_partial_run.errors import SessionError
from llm_partial_run.local import LocalLink
from llm_partial_run.parts import cache_bytes, load_any_part
from llm_partial_run.session import LocalModel, Pipeline

PROMPTS = [[5, 9, 2, 7, 11], [3, 4], [8, 1, 6]]


@pytest.fixture(params=["llama", "falcon"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def hf_tokens(model, prompts, n=8):
    return llm_sampler.generate(llm_sampler.HFCausalLM(model), prompts, max_new_tokens=n,
                                cached=True)  # fmt: skip


def test_local_model_generates_what_transformers_generates(tiny):
    model = LocalModel(tiny.directory, tiny.specs)
    with model.session(batch_size=len(PROMPTS), max_len=32) as session:
        batch = llm_sampler.generate(session, PROMPTS, max_new_tokens=8, cached=True)
    assert batch == hf_tokens(tiny.hf, PROMPTS)
    with model.session(batch_size=1, max_len=32) as session:
        alone = llm_sampler.generate(session, PROMPTS[:1], max_new_tokens=8, cached=True)
    assert alone == hf_tokens(tiny.hf, PROMPTS[:1]) == batch[:1]
    assert len(set(sum(batch, []))) > 3  # the tokens vary, so a wrong cache would show


def test_streamed_layers_generate_the_same_tokens(tiny):
    with LocalModel(tiny.directory, ("b 0-4", "4-6 e"), resident_layers=2) as model:
        assert model.infos[0].resident_layers == 2
        with model.session(batch_size=len(PROMPTS), max_len=32) as session:
            batch = llm_sampler.generate(session, PROMPTS, max_new_tokens=8, cached=True)
    assert batch == hf_tokens(tiny.hf, PROMPTS)


@pytest.mark.cuda
def test_parts_on_a_gpu_generate_the_same_tokens(tiny_llama):
    model = LocalModel(tiny_llama.directory, tiny_llama.specs, devices=["cuda", "cpu", "cuda"])
    with model.session(batch_size=len(PROMPTS), max_len=32) as session:
        logits = session(torch.tensor([[5, 9, 2]]))
        assert logits.device.type == "cpu"  # back where the ids were
    with model.session(batch_size=len(PROMPTS), max_len=32) as session:
        batch = llm_sampler.generate(session, PROMPTS, max_new_tokens=8, cached=True)
    assert batch == hf_tokens(tiny_llama.hf, PROMPTS)


def test_whole_model_in_one_part_and_timing_stats(tiny_llama):
    model = LocalModel(tiny_llama.directory)  # "f"
    assert [info.spec for info in model.infos] == ["b 0-6 e"]
    with model.session(batch_size=3, max_len=32) as session:
        tokens = llm_sampler.generate(session, PROMPTS, max_new_tokens=4, cached=True)
        assert len(session.stats) == 4 and session.stats[0].tokens == 5
        step = session.stats[-1]
        assert step.links[0].name == "local b 0-6 e" and step.compute > 0
        assert step.wall >= step.compute + step.transfer
    assert tokens == hf_tokens(tiny_llama.hf, PROMPTS, 4)


def test_uncached_session_scores_like_transformers(tiny_llama):
    continuations = [[1, 2, 3], [4], [7, 7]]
    model = LocalModel(tiny_llama.directory, tiny_llama.specs)
    with model.session(batch_size=3, max_len=32, cached=False) as session:
        ours = llm_sampler.score_continuations(session, PROMPTS, continuations, batch_size=2)
    theirs = llm_sampler.score_continuations(
        llm_sampler.HFCausalLM(tiny_llama.hf, cached=False), PROMPTS, continuations
    )
    torch.testing.assert_close(ours.total, theirs.total, atol=1e-4, rtol=0)


@pytest.fixture
def part(tiny_llama):
    return load_any_part(tiny_llama.directory, "b 0-6 e")


def test_a_repeated_step_returns_the_same_output_and_is_not_applied_twice(part):
    link = LocalLink(part)
    ids = torch.tensor([[5, 9, 2]])
    link.open_session("s", 1, 16)
    out0, compute = link.forward("s", 0, ids, None)
    again, _ = link.forward("s", 0, ids, None)
    assert again is out0 and compute > 0
    out1, _ = link.forward("s", 1, torch.tensor([[7]]), None)
    link.open_session("fresh", 1, 16)
    link.forward("fresh", 0, ids, None)
    expected, _ = link.forward("fresh", 1, torch.tensor([[7]]), None)
    torch.testing.assert_close(out1, expected, atol=0, rtol=0)  # step 0 ran once
    with pytest.raises(SessionError, match="expects step 2, got 4"):
        link.forward("s", 4, torch.tensor([[7]]), None)
    with pytest.raises(SessionError, match="expects step 2, got 0"):
        link.forward("s", 0, ids, None)  # older than the last step
    with pytest.raises(SessionError, match="already open"):
        link.open_session("s", 1, 16)
    link.close_session("s")
    link.close_session("s")  # idempotent
    with pytest.raises(SessionError, match="no open session 's'"):
        link.forward("s", 2, torch.tensor([[7]]), None)


class CountingPart:
    """A part whose caches are counted, to see that a refused session allocates nothing."""

    def __init__(self, part):
        self.inner, self.made = part, 0
        self.spec, self.config, self.dtype, self.device = (
            part.spec, part.config, part.dtype, part.device,
        )  # fmt: skip

    def cache_bytes(self, batch_size, max_len):
        return cache_bytes(self.inner, batch_size, max_len)

    def new_cache(self, batch_size, max_len):
        self.made += 1
        return self.inner.new_cache(batch_size, max_len)

    def __call__(self, x, mask, cache):
        return self.inner(x, mask, cache)


def test_caps_refuse_before_allocating(part):
    counting = CountingPart(part)
    one = cache_bytes(part, 1, 16)
    assert one > 0
    link = LocalLink(counting, max_sessions=2, max_cache_bytes=3 * one)
    link.open_session("a", 1, 16)
    with pytest.raises(SessionError, match=rf"needs {3 * one} bytes; {one} of the cap of"):
        link.open_session("big", 3, 16)
    link.open_session("b", 2, 16)
    with pytest.raises(SessionError, match="2 sessions are open, the cap is 2"):
        link.open_session("c", 1, 16)
    assert counting.made == 2
    assert link.stats() == {"sessions": 2, "cache_bytes": 3 * one}
    link.close_session("a")
    link.open_session("c", 1, 16)


def test_idle_sessions_expire(part):
    now = [0.0]
    link = LocalLink(part, session_ttl=10.0, clock=lambda: now[0])
    link.open_session("old", 1, 8)
    link.open_session("busy", 1, 8)
    now[0] = 8.0
    link.forward("busy", 0, torch.tensor([[1]]), None)
    now[0] = 12.0
    assert link.expire() == ["old"]
    with pytest.raises(SessionError, match="session 'old' expired"):
        link.forward("old", 0, torch.tensor([[1]]), None)
    link.forward("busy", 1, torch.tensor([[2]]), None)
    assert link.stats()["sessions"] == 1


class RowCache:
    """A cache that records keep_rows / join (the pass-through, whatever the family does)."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def keep_rows(self, rows):
        self.calls.append(("keep_rows", rows))
        self.rows = len(rows)

    def join(self, other):
        self.calls.append(("join", other.rows))
        self.rows += other.rows


class RowPart(CountingPart):
    def cache_bytes(self, batch_size, max_len):
        return batch_size

    def new_cache(self, batch_size, max_len):
        return RowCache(batch_size)


def test_keep_rows_and_join_reach_the_cache(part):
    link = LocalLink(RowPart(part))
    link.open_session("a", 3, 8)
    link.open_session("b", 2, 8)
    cache = link._sessions["a"].cache
    link.keep_rows("a", [2, 0])
    link.join("a", "b")
    assert cache.calls == [("keep_rows", [2, 0]), ("join", 2)] and cache.rows == 4
    assert link.stats()["sessions"] == 1  # the joined session is gone
    with pytest.raises(SessionError, match="local b 0-6 e: rows must be a list of ints"):
        link.keep_rows("a", ["x"])  # refusals name the part (over dist: "rank 2")
    with pytest.raises(SessionError, match="local b 0-6 e: batch_size must be an int"):
        link.open_session("c", 0, 8)
    with pytest.raises(SessionError, match="local b 0-6 e: a session id is a string"):
        link.open_session("", 1, 8)


def test_keep_rows_and_join_on_a_real_cache(tiny_llama):
    """A row leaves a running batch, another joins it; each row's greedy tokens stay those it
    gets alone."""
    model = LocalModel(tiny_llama.directory, tiny_llama.specs)
    probe = model.links[0].part.new_cache(1, 1)
    if not hasattr(probe, "keep_rows"):
        pytest.skip("the model package's cache has no keep_rows/join yet (issue 12)")
    a = model.session(batch_size=3, max_len=32)
    b = model.session(batch_size=1, max_len=32)
    first_a = a(torch.tensor([[5, 9, 2], [3, 4, 8]]))[:, -1].argmax(-1)
    first_b = b(torch.tensor([[8, 1, 6]]))[:, -1].argmax(-1)
    a.keep_rows([1])
    a.join(b)
    tokens = [torch.stack([first_a[1], first_b[0]])]
    for _ in range(3):
        tokens.append(a(tokens[-1][:, None])[:, -1].argmax(-1))
    ours = torch.stack(tokens, 1).tolist()
    assert ours == [hf_tokens(tiny_llama.hf, [p], 4)[0] for p in ([3, 4, 8], [8, 1, 6])]
    a.close()


def test_from_parts_and_errors(tiny_llama):
    parts = [load_any_part(tiny_llama.directory, s) for s in tiny_llama.specs]
    pipeline = LocalModel.from_parts(parts)
    assert isinstance(pipeline, Pipeline)
    with pipeline.session(1, 8) as session:
        with pytest.raises(SessionError, match="ids must be a LongTensor"):
            session(torch.tensor([1, 2]))
        session(torch.tensor([[1, 2]]))
    with pytest.raises(SessionError, match="is closed"):
        session(torch.tensor([[1]]))


class MeetingLock:
    """A session lock that, once taken, waits (briefly) until the other join has taken one too:
    the interleaving in which two joins taking their locks in opposite orders deadlock."""

    def __init__(self, meeting: threading.Barrier) -> None:
        self.lock, self.meeting = threading.Lock(), meeting

    def __enter__(self):
        self.lock.acquire()
        try:
            self.meeting.wait(0.5)
        except threading.BrokenBarrierError:  # the other join waits on this lock: no meeting
            pass

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def locked(self) -> bool:
        return self.lock.locked()


def test_two_joins_in_opposite_orders_do_not_deadlock(part):
    """A client joining a into b while another joins b into a: one wins, one is refused, and
    neither session's lock stays taken for ever (no thread of the node is stuck)."""
    link = LocalLink(RowPart(part))
    link.open_session("a", 4, 8)
    link.open_session("b", 4, 8)
    meeting = threading.Barrier(2)
    for sid in ("a", "b"):
        link._sessions[sid].lock = MeetingLock(meeting)
    errors = []

    def join(first, second) -> None:
        try:
            link.join(first, second)
        except SessionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=join, args=p, daemon=True) for p in (("a", "b"), ("b", "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), "the two joins deadlocked"
    assert len(errors) == 1 and link.stats()["sessions"] == 1
