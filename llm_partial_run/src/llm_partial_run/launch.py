"""``torchrun --nproc-per-node N -m llm_partial_run.launch DIR ...``: one model over N ranks.

Each rank loads only its part of the sepweight model in DIR: ``--parts auto`` (the default)
cuts it into N contiguous parts of about equal weight bytes round the ring (rank 0 holds the
end, begin and the first layers: ``"b 0-7 + e"``, so the ring's last transfer carries hidden
states, not logits); ``--parts "b 0-10,10-20,20-30 e"`` gives rank r the r-th spec (rank 0 may
hold two, joined by ``+``), checked like any chain before anything loads. Ranks > 0 serve their
part (:func:`llm_partial_run.dist.serve_rank`); rank 0 tokenizes, drives a
:class:`~llm_partial_run.session.Pipeline` over its own parts and the other ranks'
(:meth:`~llm_partial_run.dist.Cluster.chain`: when rank r holds the r-th part, one
:class:`~llm_partial_run.dist.RanksLink` for ranks 1..N-1, so a step's hidden states go rank to
rank), and either answers ``--prompt`` (or token ``--ids``) and exits, or serves the
OpenAI-compatible HTTP API (``--api --port 8000``).

Examples::

    torchrun --nproc-per-node 3 -m llm_partial_run.launch ./smollm2 --prompt "Hello"
    torchrun --nproc-per-node 2 -m llm_partial_run.launch ./llama --device cuda --api --port 8000
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29500 \\
        -m llm_partial_run.launch ./llama --parts auto --device cuda --api

A rank that dies ends every other rank within ``--timeout`` seconds with an error naming it.
Recovery is torchrun's: ``torchrun --max-restarts 3 ...`` starts the whole group again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from llm_sepweight import Manifest, PartSpec, PartSpecError, read_manifest

from .errors import ChainError, NodeError, PartialRunError
from .transport import PartInfo

log = logging.getLogger(__name__)


PLUS = "+"
"""Joins rank 0's parts when it holds two: ``"b 0-7 + e"`` (begin and the first layers, and
the end: the ring's last transfer carries hidden states, not logits)."""


def auto_parts(manifest: Manifest, n: int, *, end_on_rank0: bool = True) -> list[str]:
    """Cut the model into ``n`` contiguous parts of about equal weight bytes (the files' sizes
    in the manifest), one per rank, each at least one layer. The cut minimises the largest part
    (the pipeline's slowest stage).

    ``end_on_rank0`` (default): the parts are cut round the ring, rank 0's being the end (the
    head: its bytes count on rank 0), begin and the first layers -- ``["b 0-7 + e", "7-30"]``;
    each step's last transfer then carries hidden states back to rank 0 instead of the logits,
    and rank 0 may hold no layer at all (``"b + e"``). Else rank 0 holds begin and the last
    rank end (``["b 0-15", "15-30 e"]``). Bytes are not compute: a head computes faster per
    byte than layers, so with micro-batches in flight the line cut can be the better balanced
    (bench/pipeline_dist.py ``--layout both``)."""
    layers = manifest.num_layers
    ring = end_on_rank0 and n > 1
    if n < 1 or n > layers + ring:
        raise ChainError(
            f"cannot cut a {layers}-layer model into {n} parts of at least one layer each: "
            "use fewer ranks or give --parts"
        )
    size = {name: int(entry.get("bytes", 0)) for name, entry in manifest.files.items()}
    begin, end = size.get("begin.safetensors", 0), size.get("end.safetensors", 0)
    mids = [size.get(f"mid.{i:05d}.safetensors", 0) for i in range(layers)]
    cum = [0]
    for b in mids:
        cum.append(cum[-1] + b)

    def weight(k: int, i: int, j: int) -> int:  # part k: layers i..j-1, begin/end where they live
        extra = (begin + (end if ring else 0)) if k == 1 else 0
        return cum[j] - cum[i] + extra + (end if j == layers and not ring else 0)

    # best[k][j]: the smallest largest part when layers 0..j-1 are cut into k parts
    inf = float("inf")
    best = [[inf] * (layers + 1) for _ in range(n + 1)]
    cut = [[0] * (layers + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        least = 0 if k == 1 and ring else 1  # layers this part holds at least
        for j in range(layers + 1):
            for i in range(j - least + 1):
                value = max(best[k - 1][i], weight(k, i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [layers], layers
    for k in range(n, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.reverse()
    specs = []
    for k in range(n):
        tokens = ["b"] if k == 0 else []
        if bounds[k + 1] > bounds[k]:
            tokens.append(f"{bounds[k]}-{bounds[k + 1]}")
        if k == n - 1 and not ring:
            tokens.append("e")
        specs.append(" ".join(tokens))
    if ring:
        specs[0] += f" {PLUS} e"
    return specs


def rank_specs(text: str) -> list[str]:
    """A rank's parts in a plan (``"b 0-7 + e"``: two; ``"7-30"``: one)."""
    return [s.strip() for s in text.split(PLUS)]


class _Planned:
    """A stand-in link for the chain check before anything loads: just a name."""

    def __init__(self, rank: int, spec: str) -> None:
        self.rank, self.name = rank, f"rank {rank} [{spec}]"


def plan_parts(manifest: Manifest, parts: str, world_size: int) -> list[str]:
    """The spec of every rank: ``parts`` is ``"auto"`` or one spec per rank, comma-separated
    (``"b 0-10,10-20,20-30 e"``; rank 0 may hold two joined by ``+``: ``"b 0-10 + e,10-20,
    20-30"``), checked like any chain (ChainError names the rank)."""
    from .chain import check_chain

    if parts.strip() == "auto":
        return auto_parts(manifest, world_size)
    specs = [s.strip() for s in parts.split(",")]
    if len(specs) != world_size:
        raise ChainError(
            f"--parts gives {len(specs)} specs for {world_size} ranks: give one per rank, "
            "comma-separated, or --parts auto"
        )
    infos, planned = [], []
    for rank, text in enumerate(specs):
        parts = rank_specs(text)
        if len(parts) > (2 if rank == 0 else 1):
            raise ChainError(
                f"rank {rank} is given {len(parts)} parts ({text!r}): rank 0 may hold two "
                f'("b 0-7 {PLUS} e"), every other rank one'
            )
        try:
            resolved = [str(PartSpec.parse(p).resolve(manifest.num_layers)) for p in parts]
        except PartSpecError as exc:
            raise ChainError(f"--parts: rank {rank}'s {text!r}: {exc}") from None
        infos += [(_Planned(rank, spec), _planned_info(manifest, spec)) for spec in resolved]
        planned.append(f" {PLUS} ".join(resolved))
    seen: dict[str, int] = {}
    for link, info in infos:
        rank = link.rank
        if info.spec in seen:
            raise ChainError(
                f"ranks {seen[info.spec]} and {rank} both hold part {info.spec!r}: each rank "
                "holds its own part (a torchrun cluster has no spares; torchrun restarts it)"
            )
        seen[info.spec] = rank
    check_chain(infos)
    return planned


def _planned_info(manifest: Manifest, spec: str) -> PartInfo:
    return PartInfo(arch=manifest.arch, spec=spec, num_layers=manifest.num_layers,
                    dtype=manifest.dtype, device="planned")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The launcher's arguments (every rank parses the same command line)."""
    from .streaming import add_packed_arguments

    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m llm_partial_run.launch",
        description="Run one sepweight model over the ranks torchrun starts: each rank holds a "
        "part, rank 0 tokenizes, samples and answers.",
    )
    p.add_argument("directory", help="the sepweight model directory (the same path on every rank)")
    p.add_argument(
        "--parts",
        default="auto",
        help='"auto" (equal weight bytes round the ring, rank 0 holding begin and end) or one '
        'spec per rank, rank 0 possibly two joined by +: "b 0-10,10-20,20-30 e", '
        '"b 0-10 + e,10-20,20-30"',
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: gloo carries hidden states; cuda: rank r on cuda:LOCAL_RANK, NCCL",
    )
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16 (default: the model's)"
    )
    p.add_argument(
        "--resident-layers",
        type=int,
        default=None,
        metavar="K",
        help="stream each rank's layers, at most K on its device at once",
    )
    add_packed_arguments(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a rank may stay silent before the cluster stops (default 60)",
    )
    p.add_argument(
        "--spin-ms",
        type=float,
        default=0.0,
        help="busy-poll each receive this long around its expected arrival during a steady "
        "decode (saves gloo's second thread wake per receive for CPU time; on a 2-vCPU VM up "
        "to 0.15 ms a token, not in every run; only where every rank has a core of its own; "
        "default 0: never)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the part's files")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    what.add_argument(
        "--ids",
        action="append",
        help="a batch of prompts as token ids, rows split by ';' ('1,2,3;4,5'); repeat for "
        "several batches; prints each batch's new ids as a JSON line",
    )
    what.add_argument("--api", action="store_true", help="serve the OpenAI-compatible HTTP API")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1", help="the API's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the API's port (default 8000)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run this rank's share; returns the exit status (errors: one line on stderr)."""
    args = build_parser().parse_args(argv)
    rank_text = os.environ.get("RANK", "?")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(asctime)s rank {rank_text} %(name)s %(levelname)s: %(message)s",
    )
    from .dist import close_ranks, init_ranks

    try:
        groups = init_ranks(args.device, timeout=args.timeout, spin=args.spin_ms / 1e3)
        manifest = read_manifest(args.directory)
        specs = plan_parts(manifest, args.parts, groups.world_size)
        log.info("parts: %s", specs)
        if groups.rank == 0:
            _drive(args, groups, specs)
        else:
            _serve(args, groups, specs[groups.rank])
    except (PartialRunError, OSError, ValueError) as exc:
        print(f"llm_partial_run.launch: rank {rank_text}: error: {exc}", file=sys.stderr,
              flush=True)  # fmt: skip
        os._exit(1)  # the process group's threads may still wait on a dead peer: do not join
    close_ranks()
    return 0


def _load_link(args: argparse.Namespace, groups: Any, spec: str, named: bool = False) -> Any:
    """This rank's part as a LocalLink named ``rank R`` (``named``: ``rank R [SPEC]``, for a
    rank that holds two)."""
    from .local import LocalLink, load_with_info

    # (the info's fingerprint makes the chain check refuse ranks whose copies of the model differ)
    part, info = load_with_info(args.directory, spec, device=groups.device, dtype=args.dtype,
                                verify=not args.no_verify, resident_layers=args.resident_layers,
                                pack=not args.no_pack, packed_dir=args.packed_dir)  # fmt: skip
    name = f"rank {groups.rank} [{spec}]" if named else f"rank {groups.rank}"
    return LocalLink(part, info=info, name=name)


def _serve(args: argparse.Namespace, groups: Any, spec: str) -> None:
    from .dist import serve_rank

    serve_rank(_load_link(args, groups, spec), groups)


def _drive(args: argparse.Namespace, groups: Any, specs: list[str]) -> None:
    from .dist import Cluster
    from .session import Pipeline

    def fail_now(error: NodeError) -> None:  # a rank died while rank 0 was idle (API mode)
        print(f"llm_partial_run.launch: rank 0: error: {error}", file=sys.stderr, flush=True)
        os._exit(1)

    parts = rank_specs(specs[0])
    own = [_load_link(args, groups, spec, len(parts) > 1) for spec in parts]
    with Cluster(groups, on_failure=fail_now) as cluster:
        pipeline = Pipeline(cluster.chain(own))  # hidden states go rank to rank
        if args.api:
            _serve_api(args, pipeline)
        else:
            _answer(args, pipeline)


def _answer(args: argparse.Namespace, pipeline: Any) -> None:
    """Generate for ``--prompt`` (one batch, printed as text) or each ``--ids`` batch (printed
    as one JSON line ``{"tokens": [[...], ...]}`` per batch)."""
    if args.ids:
        for text in args.ids:
            rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
            out = _generate(args, pipeline, rows, stops=None, pad=0)
            print(json.dumps({"tokens": out}), flush=True)
        return
    from .text import Tokenizer

    tokenizer = Tokenizer.from_dir(args.directory)
    prompts = [_chat(tokenizer, p) for p in args.prompt] if args.chat else args.prompt
    rows = [tokenizer.encode(p, add_special_tokens=not args.chat) for p in prompts]
    stops, pad = tokenizer.eos_token_ids or None, tokenizer.pad_token_id or 0
    for tokens in _generate(args, pipeline, rows, stops=stops, pad=pad):
        print(tokenizer.decode(tokens), flush=True)


def _generate(
    args: argparse.Namespace, pipeline: Any, rows: list[list[int]], *, stops: Any, pad: int
) -> list[list[int]]:
    import llm_sampler

    if not rows or not all(rows):
        raise PartialRunError("every prompt needs at least one token")
    sampling = None
    if args.temperature > 0:
        sampling = llm_sampler.SamplingConfig(temperature=args.temperature)
    max_len = max(len(r) for r in rows) + args.max_new_tokens
    out: list[list[int]] = [[] for _ in rows]
    with pipeline.session(batch_size=len(rows), max_len=max_len) as session:
        steps = llm_sampler.generate_stream(
            session, rows, max_new_tokens=args.max_new_tokens, cached=True, sampling=sampling,
            seed=args.seed, stop_token_ids=stops, pad_token_id=pad,
        )  # fmt: skip
        for i, step in enumerate(steps):
            log.info("step %d: %d rows", i, len(rows))
            for row, token in zip(out, step.tolist(), strict=True):
                if token != llm_sampler.STOPPED:
                    row.append(token)
    return out


def _chat(tokenizer: Any, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _serve_api(args: argparse.Namespace, pipeline: Any) -> None:
    """The OpenAI-compatible API over the ranks' pipeline; prints ``ready URL`` once listening
    (``--port 0``: a free port). Concurrent requests share decode steps (rows join and leave
    the batch on every rank)."""
    from .api import serve_api
    from .text import Tokenizer

    def ready(url: str) -> None:
        print(f"ready {url}", flush=True)

    config = read_manifest(args.directory).config
    known = config.get("max_position_embeddings")
    serve_api(
        pipeline, args.host, args.port, on_ready=ready,
        tokenizer=Tokenizer.from_dir(args.directory),
        model_name=os.path.basename(os.path.normpath(args.directory)),
        context_len=min(2048, known) if known else None,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
