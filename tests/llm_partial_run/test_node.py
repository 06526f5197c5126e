"""Nodes: parts served by ``llm-partial-run serve`` processes on 127.0.0.1, chained by a Pipeline.

Three node processes per model (a tiny Llama, a tiny Falcon, the real SmolLM2) give the greedy
tokens of transformers and of the in-process LocalModel, batch 1 and left-padded; many clients
at once; tokens and TLS; caps, expiry and repeated steps over the wire; a corrupt file refuses
to start; SIGTERM stops a node cleanly.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time

import pytest
import torch

import llm_sampler
from llm_partial_run.errors import ChainError, NodeError, SessionError
from llm_partial_run.node import Node
from llm_partial_run.remote import RemoteLink
from llm_partial_run.session import LocalModel, Pipeline

PROMPTS = [[5, 9, 2, 7, 11], [3, 4], [8, 1, 6]]
SMOLLM2_SPECS = ("b 0-10", "10-20", "20-30 e")


def generate(forward, prompts, n=8):
    return llm_sampler.generate(forward, prompts, max_new_tokens=n, cached=True)


def hf_generate(model, prompts, n=8):
    return generate(llm_sampler.HFCausalLM(model), prompts, n)  # a fresh cache each time


@pytest.fixture(params=["llama", "falcon"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def test_three_nodes_generate_what_transformers_and_local_generate(tiny, shared_nodes):
    addresses = shared_nodes(tiny.directory, tiny.specs)
    local = LocalModel(tiny.directory, tiny.specs)
    with Pipeline(addresses[::-1], timeout=30) as pipeline:
        assert [i.spec for i in pipeline.infos] == list(tiny.specs)  # ordered by spec
        with pipeline.session(len(PROMPTS), 32) as session:
            batch = generate(session, PROMPTS)
        with pipeline.session(1, 32) as session:
            alone = generate(session, PROMPTS[2:])
        step = session.stats[-1]
        assert [t.name for t in step.links] == addresses
        assert all(t.compute > 0 for t in step.links)
    with local.session(len(PROMPTS), 32) as session:
        assert batch == generate(session, PROMPTS)
    assert batch == hf_generate(tiny.hf, PROMPTS)
    assert alone == hf_generate(tiny.hf, PROMPTS[2:]) == batch[2:]


def test_real_nodes_that_do_not_chain_are_refused(tiny_llama, tiny_falcon, shared_nodes):
    llama = shared_nodes(tiny_llama.directory, tiny_llama.specs)
    falcon = shared_nodes(tiny_falcon.directory, tiny_falcon.specs)
    with pytest.raises(ChainError, match=f"node {falcon[1]} serves architecture 'falcon'"):
        Pipeline([llama[0], falcon[1], falcon[2]])
    with pytest.raises(ChainError, match=f"gap: no node holds layers 2-4 .* node {llama[2]}"):
        Pipeline([llama[0], llama[2]])
    with pytest.raises(ChainError, match=f"node {llama[0]} is listed twice"):
        Pipeline([llama[0], llama[1], llama[2]], spares=[llama[0]])


@pytest.mark.slow
def test_smollm2_on_three_nodes(smollm2_sepweight, smollm2_transformers, shared_nodes):
    model, tokenizer = smollm2_transformers
    texts = ["The capital of France is", "Once upon a time, in a small village,"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    addresses = shared_nodes(smollm2_sepweight, SMOLLM2_SPECS)
    with Pipeline(addresses, timeout=60) as pipeline:
        with pipeline.session(2, 64) as session:
            batch = generate(session, prompts)  # left-padded: the prompts' lengths differ
        with pipeline.session(1, 64) as session:
            alone = generate(session, prompts[:1])
        assert "tokenizer.json" in pipeline.tokenizer_files()
    assert batch == hf_generate(model, prompts)
    assert alone == hf_generate(model, prompts[:1]) == batch[:1]
    with LocalModel(smollm2_sepweight).session(2, 64) as session:
        assert batch == generate(session, prompts)


def test_two_clients_at_once_each_get_their_own_output(tiny_llama, shared_nodes):
    addresses = shared_nodes(tiny_llama.directory, tiny_llama.specs)
    jobs = [PROMPTS[:2], PROMPTS[2:], [[1, 2, 3, 4]], [[9]]]
    results: dict[int, list] = {}

    def client(i: int) -> None:
        with Pipeline(addresses, timeout=30) as pipeline:
            with pipeline.session(len(jobs[i]), 48) as session:
                results[i] = generate(session, jobs[i], 16)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {i: results.get(i) for i in range(len(jobs))} == {
        i: hf_generate(tiny_llama.hf, job, 16) for i, job in enumerate(jobs)
    }


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key (made with openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the TLS test needs the openssl command-line tool")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return cert, key


def test_token_and_tls_node_refuses_clients_without_the_token(
    tiny_llama, node_process, certificate, tmp_path
):
    cert, key = certificate
    (tmp_path / "token").write_text("a long random secret\n")
    node = node_process(tiny_llama.directory, "f", "--token-file", str(tmp_path / "token"),
                        "--tls-cert", str(cert), "--tls-key", str(key))  # fmt: skip
    context = ssl.create_default_context(cafile=str(cert))
    with pytest.raises(NodeError, match=f"node {node.address}: refused the connection"):
        Pipeline([node.address], ssl_context=context, timeout=10)
    with pytest.raises(NodeError, match=f"node {node.address}: refused the connection"):
        Pipeline([node.address], token="wrong", ssl_context=context, timeout=10)
    with pytest.raises(NodeError, match=f"node {node.address}"):  # TLS needed: never hangs
        Pipeline([node.address], token="a long random secret", timeout=5)
    with Pipeline([node.address], token="a long random secret", ssl_context=context) as pipeline:
        with pipeline.session(1, 16) as session:
            assert generate(session, PROMPTS[:1], 4) == hf_generate(tiny_llama.hf, PROMPTS[:1], 4)


@pytest.fixture(scope="module")
def small_node(tiny_llama):
    """An in-process node (a thread) with tight caps and a short TTL."""
    node = Node(tiny_llama.directory, "f", max_sessions=2, session_ttl=0.3)
    server = node.listen()
    yield node, "{}:{}".format(*server.address)
    server.close()
    node.close()


def test_caps_refuse_clearly_over_the_wire(small_node):
    node, address = small_node
    one = node.link.part.cache_bytes(1, 64) if hasattr(node.link.part, "cache_bytes") else None
    with Pipeline([address]) as pipeline:
        a, b = pipeline.session(1, 64), pipeline.session(1, 64)
        with pytest.raises(SessionError, match="2 sessions are open, the cap is 2"):
            pipeline.session(1, 64)
        a.close()
        node.link.max_cache_bytes = node.link.stats()["cache_bytes"] + 10
        with pytest.raises(SessionError, match="needs .* bytes; .* of the cap of"):
            pipeline.session(1, 64)
        node.link.max_cache_bytes = None
        b.close()
    assert node.link.stats() == {"sessions": 0, "cache_bytes": 0}
    assert one is None or one > 0


def test_idle_session_expires_and_a_repeated_step_is_harmless(small_node):
    node, address = small_node
    link = RemoteLink(address, timeout=10)
    ids = torch.tensor([[5, 9, 2]])
    link.open_session("s", 1, 16)
    out, _ = link.forward("s", 0, ids, None)
    again, _ = link.forward("s", 0, ids, None)  # e.g. a client retrying a step it lost
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    with pytest.raises(SessionError, match=f"node {address}: .*expects step 1, got 3"):
        link.forward("s", 3, ids, None)  # the refusal names the node, as the client knows it
    deadline = time.monotonic() + 10
    while node.link.stats()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the node's reaper frees it after 0.3 s idle
    with pytest.raises(SessionError, match="session 's' expired"):
        link.forward("s", 1, ids, None)
    link.close()


def test_binding_beyond_loopback_without_a_token_warns(tiny_llama, caplog):
    node = Node(tiny_llama.directory, "b 0-2", verify=False)
    with caplog.at_level(logging.WARNING, logger="llm_partial_run.node"):
        server = node.listen("0.0.0.0")
    server.close()
    assert "without a token" in caplog.text


def test_corrupt_file_refuses_to_start_and_sigterm_stops_cleanly(
    tiny_llama, node_process, tmp_path
):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama.directory, bad)
    with open(bad / "mid.00003.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    refused = node_process(bad, "2-4", wait=False)
    assert refused.proc.wait(60) == 1
    lines = refused.proc.stderr.read().strip().splitlines()
    assert len(lines) == 1 and "mid.00003.safetensors" in lines[0] and "sha256" in lines[0]
    Node(bad, "b 0-2")  # a part without the bad file verifies and loads
    ok = node_process(bad, "2-4", "--no-verify")
    link = RemoteLink(ok.address, timeout=10)  # a client connected, a session open: still clean
    link.open_session("s", 1, 8)
    link.forward("s", 0, torch.zeros(1, 2, 32), None)
    ok.proc.send_signal(signal.SIGTERM)
    assert ok.proc.wait(30) == 0
    assert ok.proc.stderr.read() == ""
    link.close()


def test_a_node_caps_cache_bytes_by_default(tiny_llama):
    node = Node(tiny_llama.directory, "b 0-2", verify=False)
    assert 0 < node.link.max_cache_bytes < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with pytest.raises(SessionError, match="cap"):
        node.open_session("huge", 1 << 20, 1 << 20)  # ~petabytes: refused before allocating
    node.open_session("small", 1, 8)
    node.close_session("small")
