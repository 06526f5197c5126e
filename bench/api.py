"""The HTTP API on SmolLM2: 1, 4 and 8 concurrent streamed clients, side by side with the model
called directly.

    python bench/api.py [--dir SEPWEIGHT_DIR] [--tokens 32] [--rounds 2] [--threads 1]
                        [--device cpu]

Prints, from one run (configurations alternated round by round, medians):
- total tokens/s of B concurrent streamed clients (B = 1, 4, 8; each asks for ``--tokens``
  tokens of a greedy completion that does not stop early), their time to first token (median and
  worst), and the ratio to one client (target: 4 clients >= 2.5x one: shared decode steps);
- the same B rows decoded by ``llm_sampler.generate`` on one session of this process (the model
  called directly: no HTTP, no batcher) and HTTP tokens/s as a fraction of that;
- the same clients against a model that costs nothing (its forward returns fixed logits): what
  the HTTP layer and the batcher cost per token, in wall time per token of a stream and in the
  server process's CPU time per token (target: at most 1 ms per token).

The clients run in a child process (the official ``openai`` client, one thread each), so the
server's process does only the server's work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# bench/socket_rpc.py would shadow the socket_rpc package: drop this folder from the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

PROMPTS = [  # greedy continues these (counting, listing) past any --tokens asked for here
    "1, 2, 3, 4, 5,",
    "a, b, c, d, e,",
    "10, 20, 30, 40,",
    "Monday, Tuesday, Wednesday,",
    "2, 4, 6, 8,",
    "January, February, March,",
    "one, two, three, four,",
    "A1, A2, A3, A4,",
]
CONCURRENCY = (1, 4, 8)


def smollm2_dir(given: str | None) -> Path:
    """The sepweight directory to bench: bench/pipeline.py's (``given``, or the GGUF converted)."""
    spec = importlib.util.spec_from_file_location("bench_pipeline", _HERE / "pipeline.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    return pipeline.smollm2_dir(given)


# ---- the client process ----------------------------------------------------------------------


def clients(url: str, model: str, streams: int, tokens: int) -> dict:
    """``streams`` concurrent streamed completions; wall time, tokens and time to first token."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    ttft = [0.0] * streams
    counts = [0] * streams
    barrier = threading.Barrier(streams + 1)

    def one(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        stream = client.completions.create(
            model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text and not ttft[i]:
                ttft[i] = time.perf_counter() - start
            if chunk.usage:
                counts[i] = chunk.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - start, "tokens": sum(counts), "ttft": ttft}


def client_main(args: argparse.Namespace) -> None:
    """Answer one JSON line per ``URL MODEL STREAMS`` line read on stdin (the parent's rounds)."""
    print("ready", flush=True)
    for line in sys.stdin:
        url, model, streams = line.split()
        result = clients(url, model, int(streams), args.tokens)
        print(json.dumps(result), flush=True)


# ---- the server process ----------------------------------------------------------------------


def direct(model, tokenizer, streams: int, tokens: int) -> float:
    """Wall seconds of ``streams`` rows x ``tokens`` tokens by llm_sampler.generate directly."""
    from llm_sampler import generate

    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(streams)]
    longest = max(map(len, prompts))
    start = time.perf_counter()
    with model.session(streams, longest + tokens) as session:
        out = generate(session, prompts, max_new_tokens=tokens, cached=True)
    assert all(len(row) == tokens for row in out)
    return time.perf_counter() - start


class InstantModel:
    """A session source whose forward costs nothing: always the same (non-stop) next token.
    Serving it measures what the HTTP layer and the batcher cost per token."""

    def __init__(self, vocab: int, token: int) -> None:
        import torch

        self.logits = torch.zeros(8, 1, vocab)
        self.logits[..., token] = 1.0

    def session(self, batch_size: int, max_len: int) -> InstantModel:
        return self

    def __call__(self, ids, mask):
        return self.logits[: ids.shape[0]].expand(ids.shape[0], ids.shape[1], -1)

    def keep_rows(self, rows) -> None:
        pass

    def join(self, other) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="SmolLM2 sepweight directory (default: convert the GGUF)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return

    import torch

    from llm_partial_run.api import ApiServer, create_app
    from llm_partial_run.session import LocalModel
    from llm_partial_run.text import Tokenizer

    torch.set_num_threads(args.threads)
    directory = smollm2_dir(args.dir)
    model = LocalModel(directory, device=args.device)
    tokenizer = Tokenizer.from_dir(directory)
    apps = {
        "smollm2": create_app(model, model_name="smollm2", context_len=256, max_concurrency=8,
                              idle_close_s=30),
        "instant": create_app(InstantModel(tokenizer.vocab_size, tokenizer.encode(" a")[0]),
                              tokenizer, model_name="instant", context_len=256,
                              max_concurrency=8),
    }  # fmt: skip
    results: dict[tuple[str, int], list[dict]] = {}
    walls: dict[int, list[float]] = {b: [] for b in CONCURRENCY}
    with ApiServer(apps["smollm2"]) as server, ApiServer(apps["instant"]) as instant:
        urls = {"smollm2": server.url, "instant": instant.url}
        child = subprocess.Popen(
            [sys.executable, __file__, "--client", "yes", "--tokens", str(args.tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout.readline().strip() == "ready"

        def ask(name: str, streams: int) -> dict:
            cpu = time.process_time()
            child.stdin.write(f"{urls[name]} {name} {streams}\n")
            child.stdin.flush()
            result = json.loads(child.stdout.readline())
            return {**result, "server_cpu": time.process_time() - cpu}

        direct(model, tokenizer, 1, 4)  # warm up
        ask("smollm2", 1)
        ask("instant", 1)
        for _ in range(args.rounds):
            for b in CONCURRENCY:
                walls[b].append(direct(model, tokenizer, b, args.tokens))
                for name in apps:
                    results.setdefault((name, b), []).append(ask(name, b))
        child.stdin.close()
        child.wait()
    model.close()
    report(results, walls, args)


def report(results: dict, walls: dict[int, list[float]], args) -> None:
    import torch

    med = statistics.median
    print(f"SmolLM2-135M, {args.tokens} tokens per stream, {args.rounds} rounds (medians), "
          f"torch threads {torch.get_num_threads()}, device {args.device or 'cpu'}")  # fmt: skip
    print(f"{'clients':>7} {'HTTP tok/s':>10} {'x one':>6} {'TTFT med':>9} {'TTFT max':>9} "
          f"{'direct tok/s':>12} {'HTTP/direct':>11}")  # fmt: skip
    base = None
    for b in CONCURRENCY:
        runs = results["smollm2", b]
        rate = med(r["tokens"] / r["wall"] for r in runs)
        base = base or rate
        ttft = [t for r in runs for t in r["ttft"]]
        direct_rate = b * args.tokens / med(walls[b])
        ttft_med, ttft_max = med(ttft) * 1e3, max(ttft) * 1e3
        print(f"{b:>7} {rate:>10.1f} {rate / base:>6.2f} {ttft_med:>7.0f}ms {ttft_max:>7.0f}ms "
              f"{direct_rate:>12.1f} {rate / direct_rate:>11.2f}")  # fmt: skip
    print("\nthe HTTP layer + batcher alone (a model that costs nothing):")
    print(f"{'clients':>7} {'tok/s':>8} {'ms/token/stream':>15} {'server CPU ms/token':>19}")
    for b in CONCURRENCY:
        runs = results["instant", b]
        rate = med(r["tokens"] / r["wall"] for r in runs)
        per_stream = med(r["wall"] / (r["tokens"] / b) for r in runs) * 1e3
        cpu = med(r["server_cpu"] / r["tokens"] for r in runs) * 1e3
        print(f"{b:>7} {rate:>8.0f} {per_stream:>15.3f} {cpu:>19.3f}")
    rate = {b: med(r["tokens"] / r["wall"] for r in results["smollm2", b]) for b in CONCURRENCY}
    direct_rate = {b: b * args.tokens / med(walls[b]) for b in CONCURRENCY}
    one = results["instant", 1]
    cpu = med(r["server_cpu"] / r["tokens"] for r in one) * 1e3
    wall = med(r["wall"] / r["tokens"] for r in one) * 1e3
    print(f"\n4 clients vs 1: {rate[4] / rate[1]:.2f}x total tokens/s, 8 vs 1: "
          f"{rate[8] / rate[1]:.2f}x (target: 4 vs 1 >= 2.5x); generate on 4 rows vs 1 row "
          f"directly: {direct_rate[4] / direct_rate[1]:.2f}x")  # fmt: skip
    vs = [f"{b} clients {rate[b] / direct_rate[b]:.2f}x" for b in CONCURRENCY]
    print("HTTP vs direct tokens/s: " + ", ".join(vs))
    print(f"HTTP layer + batcher per token (one stream, a model that costs nothing): "
          f"{wall:.3f} ms wall, {cpu:.3f} ms server CPU (target: <= 1 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
