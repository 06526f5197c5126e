"""llm_partial_run.api and .batcher: the official openai client against the HTTP API on SmolLM2
(local parts and two node processes), compared with llm_sampler.generate on the same prompt."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from llm_partial_run.api import ApiServer, create_app
from llm_partial_run.batcher import Batcher, BusyError, Event, Job, Settings, _Row
from llm_partial_run.errors import PartialRunError
from llm_partial_run.session import LocalModel, Pipeline
from llm_partial_run.text import Tokenizer
from llm_sampler import SamplingConfig, generate

openai = pytest.importorskip("openai")

KEY = "test-key"
NAME = "smollm2"
CONTEXT = 192
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3, 4, 5,"  # greedy goes on counting: only max_tokens or a disconnect end it
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
]


class CountingSource:
    """A session source that counts the sessions it opened (nothing else changes)."""

    def __init__(self, inner) -> None:
        self.inner, self.opened = inner, 0

    def session(self, batch_size: int, max_len: int):
        self.opened += 1
        return self.inner.session(batch_size, max_len)

    def tokenizer_files(self) -> dict[str, bytes]:
        return self.inner.tokenizer_files()


@pytest.fixture(scope="module")
def tok(smollm2_sepweight: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_sepweight)


@pytest.fixture(scope="module")
def local(smollm2_sepweight: Path) -> LocalModel:
    torch.set_num_threads(1)
    model = LocalModel(smollm2_sepweight, specs=("b 0-15", "15-30 e"))  # two local parts
    yield model
    model.close()


@pytest.fixture(scope="module")
def source(local) -> CountingSource:
    return CountingSource(local)


@pytest.fixture(scope="module")
def server(source):
    app = create_app(source, model_name=NAME, context_len=CONTEXT, max_concurrency=4,
                     max_queue=4, api_key=KEY, idle_close_s=0)  # fmt: skip
    with ApiServer(app) as running:
        running.app = app
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reference(source, ids: list[int], max_tokens: int, **kwargs) -> list[int]:
    """What llm_sampler.generate gives alone on a fresh session (eos included, if reached)."""
    with source.session(1, len(ids) + max_tokens) as session:
        return generate(session, [ids], max_new_tokens=max_tokens, cached=True,
                        stop_token_ids=[2], **kwargs)[0]  # fmt: skip


def chat_ids(tok: Tokenizer, messages) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def batcher(server) -> Batcher:
    return server.app.state.model.batcher


def streamed(chunks) -> tuple[str, str | None, object]:
    text, reason, usage = [], None, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(piece or "")
            reason = choice.finish_reason or reason
    return "".join(text), reason, usage


# ---- the Done-when tests ----------------------------------------------------------------------


def test_chat_greedy_equals_generate(client, local, tok) -> None:
    ids = chat_ids(tok, CHAT)
    want = reference(local, ids, 24)
    text = tok.decode(want)
    reply = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0,
                                           max_tokens=24)  # fmt: skip
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("stop" if want[-1] == 2 else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(want))
    assert reply.usage.total_tokens == len(ids) + len(want)

    stream = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    got, reason, usage = streamed(stream)
    assert got == text and reason == reply.choices[0].finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(want))


def test_completions_greedy_equals_generate(client, local, tok) -> None:
    prompt = "The three primary colours are"
    ids = tok.encode(prompt)
    want = reference(local, ids, 10)
    reply = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=10)
    assert reply.choices[0].text == tok.decode(want)
    assert reply.choices[0].finish_reason == "length" and len(want) == 10
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 10
    by_ids = client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=10,
                                       stream=True)  # fmt: skip
    assert streamed(by_ids)[:2] == (tok.decode(want), "length")


def test_four_concurrent_streams_get_their_text_alone(client, server, local, tok) -> None:
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    alone = [tok.decode(reference(local, chat_ids(tok, m), 16)) for m in messages]
    steps = batcher(server).stats()["steps"]
    got: list[str | None] = [None] * 4
    start = threading.Barrier(4)

    def ask(i: int) -> None:
        start.wait()
        stream = client.chat.completions.create(model=NAME, messages=messages[i], temperature=0,
                                                max_tokens=16, stream=True)  # fmt: skip
        got[i] = streamed(stream)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == alone
    # shared decode steps: far fewer steps than the streams' tokens together
    assert batcher(server).stats()["steps"] - steps < 2 * 16


def test_disconnect_frees_the_session(server, local) -> None:
    steps = batcher(server).stats()["steps"]
    body = {"model": NAME, "prompt": COUNTING, "max_tokens": 150, "temperature": 0,
            "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            data = []
            for line in response.iter_lines():
                data += [line] if line.startswith("data:") else []
                if len(data) == 3:
                    break
    assert batcher(server).wait_idle(30)  # the row left and the batch session closed
    assert batcher(server).stats()["steps"] - steps < 100
    assert [link.stats()["sessions"] for link in local.links] == [0, 0]  # on the parts
    assert client_ok(server)


def client_ok(server) -> bool:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    return c.models.list().data[0].id == NAME


LONG = "word " * (CONTEXT + 10)
TOO_LONG = "context_length_exceeded"
BAD = [
    ({"model": "gpt-4"}, "NotFoundError", 404, "model_not_found"),
    ({"temperature": "hot"}, "BadRequestError", 400, None),
    ({"temperature": 2.5}, "BadRequestError", 400, None),
    ({"top_p": 0}, "BadRequestError", 400, None),
    ({"max_tokens": 0}, "BadRequestError", 400, None),
    ({"max_tokens": 1.5}, "BadRequestError", 400, None),
    ({"n": True}, "BadRequestError", 400, None),
    ({"n": 5}, "BadRequestError", 400, None),
    ({"stop": ["a", "b", "c", "d", "e"]}, "BadRequestError", 400, None),
    ({"seed": "x"}, "BadRequestError", 400, None),
    ({"stream": "yes"}, "BadRequestError", 400, None),
    ({"messages": []}, "BadRequestError", 400, None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "BadRequestError", 400, None),
    ({"messages": [{"role": "user", "content": 7}]}, "BadRequestError", 400, None),
    ({"messages": [{"role": "user", "content": LONG}]}, "BadRequestError", 400, TOO_LONG),
    ({"max_tokens": CONTEXT}, "BadRequestError", 400, TOO_LONG),
    ({"logprobs": True}, "BadRequestError", 400, None),
]


@pytest.mark.parametrize(("change", "error", "status", "code"), BAD)
def test_bad_chat_requests(client, server, source, change, error, status, code) -> None:
    opened = source.opened
    request = {"model": NAME, "messages": CHAT, "max_tokens": 4, **change}
    with pytest.raises(getattr(openai, error)) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and caught.value.body.get("message")
    if code is not None:
        assert caught.value.code == code
    assert source.opened == opened  # never reached the model
    assert client_ok(server)


@pytest.mark.parametrize("prompt", ["", [], [[]], [49152], [-1], {"text": "x"}, LONG, [True, 1]])
def test_bad_completion_prompts(client, source, prompt) -> None:
    opened = source.opened
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=prompt, max_tokens=2)
    assert source.opened == opened


def test_malformed_bodies(server, source) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=server.url) as http:
        for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            r = http.post("/v1/chat/completions", content=body, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert http.get("/v1/nothing", headers=headers).status_code == 404
        assert http.get("/v1/chat/completions", headers=headers).status_code == 405
        assert http.get("/v1/models/" + NAME, headers=headers).json()["id"] == NAME


def test_api_key(server) -> None:
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2)
    body = {"model": NAME, "messages": CHAT, "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client_ok(server)


def test_seeded_sampling_and_n(client, local, tok) -> None:
    ids = chat_ids(tok, CHAT)
    config = SamplingConfig(temperature=0.9, top_p=0.95)
    want = [tok.decode(reference(local, ids, 12, sampling=config, seed=7 + i)) for i in (0, 1)]
    reply = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0.9,
                                           top_p=0.95, seed=7, n=2, max_tokens=12)  # fmt: skip
    assert [c.message.content for c in reply.choices] == want
    assert reply.usage.prompt_tokens == len(ids)


def test_stop_strings(client, local, tok) -> None:
    ids = chat_ids(tok, CHAT)
    full = tok.decode(reference(local, ids, 24))
    assert "Paris" in full
    reply = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0,
                                           max_tokens=24, stop=["Paris", "never"])  # fmt: skip
    assert reply.choices[0].message.content == full[: full.index("Paris")]
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0,
                                            max_tokens=24, stop="Paris", stream=True)  # fmt: skip
    assert streamed(stream)[:2] == (full[: full.index("Paris")], "stop")


def test_access_log(client, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="llm_partial_run.api.access"):
        client.completions.create(model=NAME, prompt="Hi", temperature=0, max_tokens=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "llm_partial_run.api.access"]
    assert any('"POST /v1/completions HTTP/1.1" 200' in x and "completion=3" in x for x in lines)


def test_busy_server_answers_429(local, tok) -> None:
    app = create_app(local, model_name=NAME, context_len=CONTEXT, max_concurrency=1, max_queue=0)
    with ApiServer(app) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        first = c.completions.create(model=NAME, prompt=COUNTING, max_tokens=150,
                                     temperature=0, stream=True)  # fmt: skip
        next(iter(first))  # the first request holds the only row
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2)
        first.close()
        assert app.state.model.batcher.wait_idle(30)
        reply = c.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2)
        assert reply.usage.completion_tokens <= 2


def test_cli_serves_a_local_model(smollm2_sepweight: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("cli-key\n")
    cmd = [sys.executable, "-m", "llm_partial_run", "api", "--model", str(smollm2_sepweight),
           "--port", "0", "--api-key-file", str(key), "--context", "128",
           "--max-concurrency", "2", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while not line.startswith("ready "):
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            line = proc.stdout.readline() if ready else ""
            assert line, f"no ready line; stderr: {proc.stderr.read() if proc.poll() else ''}"
        c = openai.OpenAI(base_url=line.split()[1] + "/v1", api_key="cli-key", max_retries=0)
        assert c.models.list().data[0].id == smollm2_sepweight.name
        reply = c.completions.create(model=smollm2_sepweight.name, prompt=COUNTING, max_tokens=3,
                                     temperature=0)  # fmt: skip
        assert reply.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    # uvicorn shuts down cleanly, then re-raises the signal it caught (the usual exit status)
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err
    assert '"POST /v1/completions HTTP/1.1" 200 prompt=' in err  # the access log


def test_streamed_model_shares_steps(smollm2_sepweight: Path, local, tok) -> None:
    """A model streaming its layers (at most 4 resident): two concurrent requests share each
    weight pass and each gets its text alone."""
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    alone = [tok.decode(reference(local, chat_ids(tok, m), 8)) for m in messages]
    model = LocalModel(smollm2_sepweight, resident_layers=4)
    try:
        app = create_app(model, model_name=NAME, context_len=CONTEXT, max_concurrency=2,
                         idle_close_s=0)  # fmt: skip
        with ApiServer(app) as server:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
            got: list[str | None] = [None, None]

            def ask(i: int) -> None:
                request = {"messages": messages[i], "temperature": 0, "max_tokens": 8}
                stream = c.chat.completions.create(model=NAME, stream=True, **request)
                got[i] = streamed(stream)[0]

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert got == alone
            assert app.state.model.batcher.wait_idle(30)
            assert app.state.model.batcher.stats()["steps"] < 2 * 8
            assert model.links[0].stats()["sessions"] == 0
    finally:
        model.close()


# ---- two nodes ---------------------------------------------------------------------------------


def test_two_nodes(smollm2_sepweight, shared_nodes, local, tok) -> None:
    from socket_rpc import Client

    addresses = shared_nodes(smollm2_sepweight, ("b 0-15", "15-30 e"))
    ids = chat_ids(tok, CHAT)
    text = tok.decode(reference(local, ids, 16))
    with Pipeline(addresses) as pipeline:
        app = create_app(pipeline, context_len=CONTEXT, max_concurrency=4, idle_close_s=0)
        name = app.state.model.name
        assert name == smollm2_sepweight.name  # reported by the nodes
        with ApiServer(app) as server:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
            reply = c.chat.completions.create(model=name, messages=CHAT, temperature=0,
                                              max_tokens=16)  # fmt: skip
            assert reply.choices[0].message.content == text
            stream = c.chat.completions.create(model=name, messages=CHAT, temperature=0,
                                               max_tokens=16, stream=True)  # fmt: skip
            assert streamed(stream)[0] == text
            stream = c.chat.completions.create(model=name, messages=CHAT, max_tokens=150,
                                               stream=True)  # fmt: skip
            next(iter(stream))
            stream.close()  # disconnect mid-stream
            assert app.state.model.batcher.wait_idle(30)
    for address in addresses:
        host, port = address.rsplit(":", 1)
        with Client(host, int(port)) as node:
            assert node.call("stats")["sessions"] == 0


# ---- the batcher alone (a fake model) ------------------------------------------------------------


class FakeSession:
    """next token = last + 1 (mod 50); records calls; keep_rows / join like the real cache."""

    def __init__(self, source: FakeSource, batch: int, max_len: int) -> None:
        self.source, self.rows, self.batch, self.closed = source, 0, batch, False

    def __call__(self, ids, mask):
        self.source.gate.wait(10)
        self.source.calls += 1
        if self.source.fail_at == self.source.calls:
            raise RuntimeError("node 127.0.0.1:1 died")
        self.rows = max(self.rows, ids.shape[0])
        return torch.nn.functional.one_hot((ids + 1) % 50, 50).float() * 5

    def keep_rows(self, rows) -> None:
        self.source.log.append(("keep", list(rows)))
        self.rows = len(rows)

    def join(self, other) -> None:
        if self.source.fail_join:
            raise RuntimeError("node 127.0.0.1:1 refused join")
        assert self.rows + other.rows <= self.batch
        self.rows += other.rows
        other.closed = True  # as Session.join: the other session is spent

    def close(self) -> None:
        self.closed = True


class FakeSource:
    def __init__(self) -> None:
        self.log: list = []
        self.sessions: list[FakeSession] = []
        self.gate = threading.Event()
        self.calls, self.fail_at, self.fail_join = 0, None, False

    def session(self, batch: int, max_len: int) -> FakeSession:
        self.sessions.append(FakeSession(self, batch, max_len))
        return self.sessions[-1]


def test_batcher_rows_join_and_leave(tok) -> None:
    source = FakeSource()
    b = Batcher(source, tok, max_rows=3, max_len=64, max_waiting=1, idle_close_s=0)
    b.start()
    try:
        events: list[tuple[int, Event]] = []

        def hear(job: int):
            return lambda event: events.append((job, event))

        b.submit(Job([[20, 21]], Settings(max_tokens=6), hear(0), n=2))
        b.submit(Job([[10]], Settings(max_tokens=3), hear(1)))
        b.submit(Job([[30]], Settings(max_tokens=2), hear(2)))  # waits for a free row
        with pytest.raises(BusyError):  # 3 rows running or about to, 1 waiting: full
            b.submit(Job([[1]], Settings(max_tokens=2), hear(3)))
        source.gate.set()
        assert b.wait_idle(10)
        texts: dict[tuple[int, int], str] = {}
        for job, e in events:
            texts[job, e.index] = texts.get((job, e.index), "") + e.text
        assert texts == {
            (0, 0): tok.decode(range(22, 28)), (0, 1): tok.decode(range(22, 28)),
            (1, 0): tok.decode(range(11, 14)), (2, 0): tok.decode([31, 32]),
        }  # fmt: skip
        assert ("keep", [0, 1]) in source.log  # the short row left, the long ones stayed
        assert all(s.closed for s in source.sessions)
    finally:
        b.stop()


def test_row_stop_strings_hold_back_text(tok) -> None:
    ids = tok.encode("Hello world, it is sunny. Bye")
    job = Job([[1]], Settings(max_tokens=50, stop=("sunny",)), lambda e: None)
    row = _Row(job, 0, [1], tok.decoder())
    out, reason = [], None
    for i in ids:
        event = row.accept(i)
        out.append(event.text)
        if event.finish_reason:
            reason = event.finish_reason
            break
    assert "".join(out) == "Hello world, it is " and reason == "stop"


def test_a_failing_model_gives_server_errors_and_the_server_goes_on(tok) -> None:
    source = FakeSource()
    source.gate.set()
    app = create_app(source, tok, model_name="fake", context_len=64, max_concurrency=2)
    with ApiServer(app) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        source.fail_at = source.calls + 3  # the prefill and one step work, then the model fails
        with pytest.raises(openai.InternalServerError, match="died"):
            c.completions.create(model="fake", prompt=[20], max_tokens=10)
        source.fail_at = source.calls + 3
        with pytest.raises(openai.APIError, match="died"):
            streamed(c.completions.create(model="fake", prompt=[20], max_tokens=10, stream=True))
        source.fail_join = True
        with pytest.raises(openai.InternalServerError, match="refused join"):
            c.completions.create(model="fake", prompt=[20], max_tokens=10)
        source.fail_join = False
        reply = c.completions.create(model="fake", prompt=[20], max_tokens=4, temperature=0)
        assert reply.choices[0].text == tok.decode([21, 22, 23, 24])
        assert app.state.model.batcher.wait_idle(10)  # rows left, the batch session closed


def listener():
    """A job's listener that keeps its events, and an Event set once the job ended."""
    ended = threading.Event()

    def hear(e) -> None:
        hear.events.append(e)
        if isinstance(e, BaseException) or e.finish_reason:
            ended.set()

    hear.events = []
    return hear, ended


def test_a_sampler_failing_on_a_decode_step_fails_that_batch_only(tok) -> None:
    """NaN logits make a sampled row's draw raise: the batch fails, the batcher goes on."""
    source = FakeSource()
    source.gate.set()
    calls, inner = [0], FakeSession.__call__

    def nan_on_the_first_decode_step(session, ids, mask):
        calls[0] += 1
        out = inner(session, ids, mask)
        return out * float("nan") if calls[0] == 2 else out

    b = Batcher(source, tok, max_rows=2, max_len=64, idle_close_s=0)
    b.start()
    try:
        FakeSession.__call__ = nan_on_the_first_decode_step
        sampled = Settings(max_tokens=5, sampling=SamplingConfig(temperature=1.0), seed=0)
        failed, failed_done = listener()
        b.submit(Job([[20]], sampled, failed))
        assert failed_done.wait(10) and isinstance(failed.events[-1], RuntimeError)
        events, finished = listener()
        b.submit(Job([[10]], Settings(max_tokens=3), events))
        assert finished.wait(10), "the batcher's thread died: the next request never ends"
        assert "".join(e.text for e in events.events) == tok.decode([11, 12, 13])
        assert b.wait_idle(10) and all(s.closed for s in source.sessions)
    finally:
        FakeSession.__call__ = inner
        b.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_batcher_whose_thread_died_refuses_new_jobs(tok, monkeypatch) -> None:
    source = FakeSource()
    source.gate.set()
    b = Batcher(source, tok, max_rows=2, max_len=64, idle_close_s=0)

    def broken() -> None:
        raise RuntimeError("a bug in the decode thread")

    monkeypatch.setattr(b, "_drop_cancelled", broken)
    b.start()
    thread = b._thread
    try:
        job, ended = listener()
        b.submit(Job([[20]], Settings(max_tokens=3), job))
        assert ended.wait(10) and isinstance(job.events[-1], Exception)  # told, not left hanging
        with pytest.raises(PartialRunError, match="not running"):  # not queued for ever
            b.submit(Job([[20]], Settings(max_tokens=3), job))
    finally:
        b.stop()
        thread.join(10)  # its exception is this test's (filtered above), not the next one's


@pytest.mark.parametrize("option", [["--resident-layers", "2"], ["--no-pack"],
                                    ["--packed-dir", "somewhere"]])  # fmt: skip
def test_cli_model_options_need_model(option: list[str], capsys) -> None:
    """Options of a local model given with --nodes: one clear line, exit 1, nothing served."""
    from llm_partial_run.cli import main

    assert main(["api", "--nodes", "127.0.0.1:1", *option]) == 1
    assert "go with --model" in capsys.readouterr().err


@pytest.mark.parametrize("gather_s", [0.0, 5.0])
def test_requests_arriving_together_at_an_idle_batcher_are_prefilled_together(tok, gather_s):
    """A request finding no row decoding waits up to ``gather_s`` for others (here a second
    one 50 ms later): both are prefilled in one session and decode together from the first
    step. Gathering ends early once the waiting rows fill ``max_rows``; 0 admits at once."""
    source = FakeSource()
    source.gate.set()
    b = Batcher(source, tok, max_rows=2, max_len=64, idle_close_s=0, gather_s=gather_s)
    b.start()
    try:
        first, first_done = listener()
        second, second_done = listener()
        start = time.monotonic()
        b.submit(Job([[20]], Settings(max_tokens=3), first))
        time.sleep(0.05)
        b.submit(Job([[10]], Settings(max_tokens=3), second))
        assert first_done.wait(10) and second_done.wait(10)
        assert time.monotonic() - start < 4  # the full rows ended the 5 s gathering at once
        prefill_rows = source.sessions[0].batch
        assert prefill_rows == (1 if gather_s == 0 else 2)
        assert "".join(e.text for e in second.events) == tok.decode([11, 12, 13])
    finally:
        b.stop()
