"""SmolLM2 over torch.distributed ranks (gloo, CPU) next to socket_rpc nodes and one process.

    python bench/pipeline_dist.py [--dir SEPWEIGHT_DIR] [--tokens 32] [--rounds 3] [--flight 3]
        [--layout ring|line|both] [--spin-ms 0 [2 ...]]

Prints, from one run (for each rank count, parts layout and spin one torchrun launch; its rank
0 alternates the configurations round by round -- the ranks, socket_rpc nodes, one process
holding the whole model -- and takes medians, so load from elsewhere hits them alike):
- one hop with no compute (an echo part: a decode step's hidden states out, its logits back),
  gloo vs socket_rpc, alternated: the transport alone;
- per-hop overhead per decode token, batch 1: (wall - the parts' compute) / remote parts, for
  2 and 3 torch.distributed ranks (rank 0 holds the first part -- and with ``--layout ring``,
  the launcher's auto parts, the end too -- so N ranks have N-1 remote parts; the step goes
  round the ring rank to rank: N transfers) and for the same chain over socket_rpc: rank 0's
  own parts in its process, the other ranks' parts on socket_rpc nodes on 127.0.0.1 (N-1
  remote parts, 2(N-1) transfers: each node's call goes out from the client and back), so
  both sides run the same local parts and differ only in how the remote ones are reached;
  target: gloo no worse. ``--layout line`` puts the end on the last rank (logits cross the
  wire); ``--spin-ms``: the ranks' polling of a receive (launch ``--spin-ms``);
- tokens/s with ``--flight`` sequences in flight (each batch 1, one decode step of every
  sequence sent through the ranks with ``forward_in_flight``: rank 0 sends sequence k+1 before
  k's result is back) on 2 and 3 ranks, vs one process decoding the same sequences one after
  another; target: 3 ranks >= 1.5x where there are cores for them. One process decoding them
  as one batch is printed too (what batching alone gives).

bench/pipeline.py calls :func:`dist_lines` for its torch.distributed lines. Each rank runs on
``--threads`` torch threads. The ranks are this file run by torchrun (``--rank-main``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench/socket_rpc.py would shadow the socket_rpc package: drop this folder from the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 1836, 28, 2952, 359, 253, 1124, 282, 253]


def _pipeline_module():
    """bench/pipeline.py (its SmolLM2 conversion, node processes and decode loop)."""
    spec = importlib.util.spec_from_file_location("bench_pipeline", _HERE / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- inside the ranks -------------------------------------------------------------------------


def _greedy_in_flight(pipeline, forward_in_flight, flight: int, tokens: int) -> float:
    """``flight`` batch-1 sequences decoded together through the chain; returns seconds for
    the decode steps (the prefill excluded)."""
    sessions = [pipeline.session(1, len(PROMPT) + tokens + 1) for _ in range(flight)]
    ids = [torch.tensor([PROMPT]) for _ in range(flight)]
    links, sids = pipeline.links, [s.id for s in sessions]
    logits = forward_in_flight(links, sids, 0, ids)  # the prefills
    left = [tokens] * flight

    def then(k: int, out: torch.Tensor) -> torch.Tensor | None:  # greedy, each on its own
        left[k] -= 1
        return out[:, -1:].argmax(-1) if left[k] > 0 else None  # tokens passes in all

    start = time.perf_counter()
    forward_in_flight(links, sids, 1, [out[:, -1:].argmax(-1) for out in logits], then=then)
    elapsed = time.perf_counter() - start
    for s in sessions:
        s.close()
    return elapsed


def _one_process(model, decode, flight: int, tokens: int) -> tuple[float, float]:
    """Seconds for ``flight`` batch-1 decodes one after another (decode steps only), and for
    the same sequences decoded as one batch."""
    sequential = sum(decode(model, tokens)[0] * tokens for _ in range(flight))
    with model.session(flight, len(PROMPT) + tokens + 1) as session:
        logits = session(torch.tensor([PROMPT] * flight))
        start = time.perf_counter()
        for _ in range(tokens):
            logits = session(logits[:, -1:].argmax(-1))
        batched = time.perf_counter() - start
    return sequential, batched


class EchoPart:
    """The last part of a SmolLM2 decode hop with no compute: hidden states [B, T, 576] in,
    zero logits [B, T, 49152] (float32) out -- the transport alone."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from llm_sepweight import PartSpec

        self.spec, self.config = PartSpec.parse("1-2 e"), SimpleNamespace(num_hidden_layers=2)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def new_cache(self, batch_size: int, max_len: int):
        from types import SimpleNamespace

        return SimpleNamespace(layers=[], batch_size=batch_size)

    def cache_bytes(self, batch_size: int, max_len: int) -> int:
        return 0

    def __call__(self, x, mask=None, cache=None):
        return torch.zeros(x.shape[0], x.shape[1], 49152)


def _echo_link():
    from llm_partial_run.local import LocalLink, part_info

    return LocalLink(EchoPart(), info=part_info(EchoPart(), arch="echo"))


def echo_node_main() -> None:
    """A socket_rpc node serving :class:`EchoPart` (``--echo-node``): prints ``ready H:P``."""
    from socket_rpc import Server, exposed

    link = _echo_link()

    class EchoNode:
        @exposed
        def info(self):
            return link.info().to_dict()

        @exposed
        def open_session(self, session_id, batch_size, max_len):
            link.open_session(session_id, batch_size, max_len)

        @exposed
        def forward(self, session_id, step, x, mask):
            return link.forward(session_id, step, x, mask)

        @exposed
        def close_session(self, session_id):
            link.close_session(session_id)

    server = Server()
    server.expose_object(EchoNode())
    server.start()
    host, port = server.address[:2]
    print(f"ready {host}:{port}", flush=True)
    sys.stdin.read()  # until the driver closes our stdin


def _echo_calls(link, session_id: str, first_step: int, calls: int) -> float:
    """Seconds per forward call of one decode-sized hidden state through ``link``."""
    x = torch.zeros(1, 1, 576)
    start = time.perf_counter()
    for step in range(first_step, first_step + calls):
        link.forward(session_id, step, x, None)
    return (time.perf_counter() - start) / calls


def echo_rank_main(args: argparse.Namespace) -> None:
    """Two ranks (``--echo``): rank 1 serves :class:`EchoPart`; rank 0 alternates calls to it
    with calls to the socket_rpc echo node at ``--nodes`` and prints ``result {json}``."""
    from llm_partial_run.dist import Cluster, close_ranks, init_ranks, serve_rank
    from llm_partial_run.remote import RemoteLink

    groups = init_ranks("cpu", timeout=300)
    if groups.rank:
        serve_rank(_echo_link(), groups)
        close_ranks()
        return
    remote = RemoteLink(args.nodes)
    found: dict[str, list[float]] = {"dist": [], "socket": []}
    with Cluster(groups) as cluster:
        links = {"dist": cluster.links[0], "socket": remote}
        for link in links.values():
            link.open_session("echo", 1, 1 << 20)
            _echo_calls(link, "echo", 0, 50)  # warm up
        step = 50
        for _ in range(args.rounds * 3):
            for name, link in links.items():
                found[name].append(_echo_calls(link, "echo", step, 100))
            step += 100
        remote.close_session("echo")
        remote.close()
    result = {name: statistics.median(v) for name, v in found.items()}
    print("result " + json.dumps(result), flush=True)
    close_ranks()


def rank_main(args: argparse.Namespace) -> None:
    """One rank of the bench cluster (run by torchrun): ranks > 0 serve; rank 0 measures, round
    by round alternated, the ranks, the socket nodes and one process (the whole model loaded
    here too), and prints ``result {json}``."""
    from llm_partial_run.dist import Cluster, close_ranks, forward_in_flight, init_ranks, serve_rank
    from llm_partial_run.launch import auto_parts, rank_specs
    from llm_partial_run.local import LocalLink
    from llm_partial_run.parts import load_any_part
    from llm_partial_run.remote import RemoteLink
    from llm_partial_run.session import LocalModel, Pipeline
    from llm_sepweight import read_manifest

    torch.set_num_threads(args.threads)
    groups = init_ranks("cpu", timeout=300, spin=args.spin_ms[0] / 1e3)
    ring = args.layout == "ring"
    specs = auto_parts(read_manifest(args.dir), groups.world_size, end_on_rank0=ring)
    spec = specs[groups.rank]
    own = [LocalLink(load_any_part(args.dir, s, verify=False), name=f"rank {groups.rank} [{s}]")
           for s in rank_specs(spec)]  # fmt: skip
    if groups.rank:
        serve_rank(own[0], groups)
        close_ranks()
        return
    decode = _pipeline_module().decode
    model = LocalModel(args.dir)
    remote = [RemoteLink(address) for address in args.nodes.split(",")]  # ranks 1..N-1's parts
    sockets = Pipeline([*own, *remote])  # (a pipeline orders its parts into the chain)
    found: dict[str, list] = {"dist": [], "socket": [], "flight": [], "one": [], "batch": []}
    with Cluster(groups) as cluster:
        pipeline = Pipeline(cluster.chain(own))
        for source in (pipeline, sockets, model):
            decode(source, 4)  # warm up
        _greedy_in_flight(pipeline, forward_in_flight, args.flight, 2)
        for _ in range(args.rounds):
            found["dist"].append(decode(pipeline, args.tokens))
            found["socket"].append(decode(sockets, args.tokens))
            found["flight"].append(
                _greedy_in_flight(pipeline, forward_in_flight, args.flight, args.tokens)
            )
            one, batch = _one_process(model, decode, args.flight, args.tokens)
            found["one"].append(one)
            found["batch"].append(batch)
    sockets.close()
    result = {"ranks": groups.world_size, "hops": groups.world_size - 1, "parts": specs}
    for name in ("dist", "socket"):
        runs = found[name]
        result[name] = [statistics.median(r[i] for r in runs) for i in range(4)]
    for name in ("flight", "one", "batch"):
        result[name + "_tps"] = args.flight * args.tokens / statistics.median(found[name])
    print("result " + json.dumps(result), flush=True)
    close_ranks()


# ---- the driver -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(directory: Path, ranks: int, nodes: list[str], *, tokens: int, rounds: int,
              flight: int, threads: int, echo: bool = False, layout: str = "ring",
              spin_ms: float = 0.0) -> dict:  # fmt: skip
    """Start ``ranks`` ranks under torchrun on 127.0.0.1 and return rank 0's measurements
    (``layout``: the auto parts' -- ``ring``, rank 0 holding the end too; ``line``, the last
    rank holding it)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--rank-main",
           "--dir", str(directory), "--tokens", str(tokens), "--rounds", str(rounds),
           "--flight", str(flight), "--threads", str(threads),
           "--nodes", ",".join(nodes), "--layout", layout, "--spin-ms", str(spin_ms),
           *(["--echo"] if echo else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("result "):
            return json.loads(line.removeprefix("result "))
    raise SystemExit(f"{ranks} ranks failed ({done.returncode}): {done.stderr[-3000:]}")


def dist_lines(directory: Path, *, tokens: int = 32, rounds: int = 3, flight: int = 3,
               threads: int = 1, ranks: tuple[int, ...] = (2, 3),
               layouts: tuple[str, ...] = ("ring",),
               spins_ms: tuple[float, ...] = (0.0,)) -> list[str]:  # fmt: skip
    """The torch.distributed lines of the pipeline bench (for bench/pipeline.py), measured now.

    For each rank count and parts layout (``ring``: the launcher's auto parts, rank 0 holding
    begin and end; ``line``: the last rank holding end, so logits cross the wire), one torchrun
    launch whose rank 0 alternates, round by round: batch-1 decode over the ranks and over the
    same parts with ranks 1..N-1's served by socket_rpc nodes (per-hop overhead side by side;
    the nodes are started per rank count and layout), and ``flight`` sequences in flight over
    the ranks vs one process (the whole model in rank 0's process) decoding them one after
    another, and as one batch.
    """
    bench = _pipeline_module()
    echo = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--echo-node"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})  # fmt: skip
    from llm_partial_run.launch import auto_parts
    from llm_sepweight import read_manifest

    manifest = read_manifest(directory)
    try:
        hop = run_ranks(directory, 2, [bench.ready(echo)], tokens=tokens, rounds=rounds,
                        flight=flight, threads=threads, echo=True)  # fmt: skip
        hop_load = os.getloadavg()[0]
        results = []
        for n, layout in itertools.product(ranks, layouts):
            # socket_rpc nodes serving what ranks 1..n-1 hold (rank 0's parts stay local)
            specs = auto_parts(manifest, n, end_on_rank0=layout == "ring")[1:]
            procs = bench.start_nodes(directory, tuple(specs), threads)
            try:
                nodes = [bench.ready(p) for p in procs]
                for spin_ms in spins_ms:
                    results.append(run_ranks(directory, n, nodes, tokens=tokens, rounds=rounds,
                                             flight=flight, threads=threads, layout=layout,
                                             spin_ms=spin_ms))  # fmt: skip
                    results[-1]["load"] = os.getloadavg()[0]  # over the last minute: the run's
                    results[-1]["spin_ms"] = spin_ms
            finally:
                for p in procs:
                    p.terminate()
                    p.wait()
    finally:
        echo.stdin.close()
        echo.wait()
    d, k = hop["dist"] * 1e3, hop["socket"] * 1e3
    lines = [
        f"  one hop, transport alone (576 floats out, 49152 back, no compute), alternated: "
        f"gloo {d:.3f} ms, socket_rpc {k:.3f} ms: gloo/socket {d / k:4.2f}x (no target: the "
        f"per-token lines below carry it; the default ring cut sends no logits) "
        f"[load {hop_load:.1f}]"
    ]
    for r in results:
        n, hops = r["ranks"], r["hops"]
        wall, compute = r["dist"][0], r["dist"][1]
        swall, scompute = r["socket"][0], r["socket"][1]
        hop, shop = (wall - compute) / hops * 1e3, (swall - scompute) / hops * 1e3
        lines.append(
            f"  {n} gloo ranks ({' | '.join(r['parts'])}; spin {r['spin_ms']:g} ms): "
            f"{wall * 1e3:6.2f} ms/token (compute "
            f"{compute * 1e3:6.2f}), "
            f"overhead {hop:5.2f} ms/hop; the same parts, {hops} on socket_rpc nodes, "
            f"alternated: {swall * 1e3:6.2f} "
            f"ms/token, {shop:5.2f} ms/hop: gloo/socket {hop / shop:4.2f}x (target <= 1x) "
            f"[load {r['load']:.1f}]"
        )
        tps, one, batch = r["flight_tps"], r["one_tps"], r["batch_tps"]
        lines.append(
            f"  {n} gloo ranks, {flight} sequences in flight: {tps:5.1f} tokens/s vs one process "
            f"{one:5.1f} (one after another): {tps / one:4.2f}x (target >= 1.5x on 3 ranks); "
            f"one process batching them: {batch:5.1f} tokens/s [load {r['load']:.1f}]"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="SmolLM2 sepweight directory (default: convert the GGUF)")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians)")
    parser.add_argument("--flight", type=int, default=3, help="sequences in flight")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--layout", choices=("ring", "line", "both"), default="ring",
                        help="auto parts: rank 0 holds the end (ring, the launcher's), the last "
                        "rank does (line), or both, one launch each")  # fmt: skip
    parser.add_argument("--spin-ms", type=float, nargs="+", default=[0.0],
                        help="the ranks' --spin-ms; several: one launch each")  # fmt: skip
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", help=argparse.SUPPRESS)
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--echo-node", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_node:
        echo_node_main()
        return
    if args.rank_main:
        (echo_rank_main if args.echo else rank_main)(args)
        return
    torch.set_num_threads(args.threads)
    directory = _pipeline_module().smollm2_dir(args.dir)
    print(f"SmolLM2-135M decode over torch.distributed (gloo, CPU), {args.tokens} tokens x "
          f"{args.rounds} rounds, {args.threads} torch thread(s) per process, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    layouts = ("ring", "line") if args.layout == "both" else (args.layout,)
    for line in dist_lines(directory, tokens=args.tokens, rounds=args.rounds, flight=args.flight,
                           threads=args.threads, layouts=layouts,
                           spins_ms=tuple(args.spin_ms)):  # fmt: skip
        print(line, flush=True)


if __name__ == "__main__":
    main()
