"""``llm-partial-run generate``: complete a prompt, streaming the text as it is generated.

Over nodes: ``generate --nodes 127.0.0.1:5001,127.0.0.1:5002 --prompt "..."``; in this process:
``generate DIR --prompt "..."`` (``--resident-layers K`` streams the layers' weights). The
tokenizer comes from ``--tokenizer DIR``, else DIR, else from the first node that has it.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import PartialRunError
from ..streaming import add_packed_arguments
from .serve import read_token


def add_parser(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    """The ``generate`` sub-command's arguments."""
    p = sub.add_parser(name, help=summary, description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path, nargs="?", help="a sepweight directory (local run)")
    p.add_argument("--nodes", help="HOST:PORT,... of the nodes (any order; a part twice: spare)")
    p.add_argument("--spares", help="HOST:PORT,... of spare nodes for parts of the chain")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user message "
                   "with the model's chat template")  # fmt: skip
    p.add_argument("--system", help="a system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest (default 0: off)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--token-file", type=Path, help="file holding the nodes' shared token")
    p.add_argument("--tls-ca", type=Path, help="CA/certificate (PEM) to reach TLS nodes")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per node call")
    p.add_argument("--tokenizer", type=Path, help="directory holding tokenizer.json")
    p.add_argument("--parts", help="local run: part specs, comma-separated (default: f)")
    p.add_argument("--device", help="local run: cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="local run: float32, bfloat16, float16")
    p.add_argument("--resident-layers", type=int, metavar="K",
                   help="local run: stream layers' weights, at most K on the device")  # fmt: skip
    add_packed_arguments(p)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--stats", action="store_true", help="print timing per token on stderr")


def run(args: argparse.Namespace) -> int:
    """Generate and stream the text to stdout; returns 0."""
    import torch

    import llm_sampler

    from ..text import Tokenizer

    if (args.directory is None) == (args.nodes is None):
        raise PartialRunError("give either a sepweight DIR (local run) or --nodes HOST:PORT,...")
    if args.threads:
        torch.set_num_threads(args.threads)
    with _source(args) as source:
        if args.tokenizer or args.directory:
            tokenizer = Tokenizer.from_dir(args.tokenizer or args.directory)
        else:
            files = source.tokenizer_files()
            if not files:
                raise PartialRunError("no node has tokenizer files: give --tokenizer DIR")
            tokenizer = Tokenizer.from_files(files)
        ids = _prompt_ids(tokenizer, args)
        sampling = llm_sampler.SamplingConfig(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
        )
        with source.session(1, len(ids) + args.max_new_tokens) as session:
            stream_completion(session, tokenizer, ids, max_new_tokens=args.max_new_tokens,
                              sampling=sampling, seed=args.seed)  # fmt: skip
            if args.stats:
                _print_stats(session)
    return 0


def _source(args: argparse.Namespace):
    from ..session import LocalModel, Pipeline

    if args.directory is not None:
        specs = [s.strip() for s in args.parts.split(",")] if args.parts else ["f"]
        return LocalModel(args.directory, specs, device=args.device, dtype=args.dtype,
                          resident_layers=args.resident_layers, pack=not args.no_pack,
                          packed_dir=args.packed_dir)  # fmt: skip
    context = ssl.create_default_context(cafile=str(args.tls_ca)) if args.tls_ca else None
    return Pipeline(
        _addresses(args.nodes), spares=_addresses(args.spares), token=read_token(args.token_file),
        timeout=args.timeout, ssl_context=context,
    )  # fmt: skip


def _addresses(text: str | None) -> list[str]:
    return [a.strip() for a in (text or "").split(",") if a.strip()]


def _prompt_ids(tokenizer, args: argparse.Namespace) -> list[int]:
    if not args.chat:
        return tokenizer.encode(args.prompt)
    return chat_ids(tokenizer, args.prompt, system=args.system)


def chat_ids(tokenizer, prompt: str, *, system: str | None = None) -> list[int]:
    """The ids of ``prompt`` as a user message (after ``system``, if given), rendered with the
    model's chat template and followed by the assistant's turn."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def stream_completion(
    session,
    tokenizer,
    ids: list[int],
    *,
    max_new_tokens: int,
    sampling=None,
    seed: int | None = None,
    write: Callable[[str], object] | None = None,
) -> list[int]:
    """Generate after ``ids`` on ``session`` (one row, cached), writing the text as it comes
    (``write``, default stdout, flushed per piece; a newline at the end); returns the new ids
    without the stop token."""
    import llm_sampler

    write = write or _write_stdout
    stops = tokenizer.eos_token_ids
    stream = llm_sampler.generate_stream(
        session, [ids], max_new_tokens=max_new_tokens, cached=True,
        sampling=sampling, seed=seed, stop_token_ids=stops or None,
    )  # fmt: skip
    decoder = tokenizer.decoder()
    tokens: list[int] = []
    for step in stream:
        token = int(step[0])
        if token == llm_sampler.STOPPED or token in stops:
            break
        tokens.append(token)
        write(decoder.add(token))
    write(decoder.flush() + "\n")
    return tokens


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_stats(session) -> None:
    decode = session.stats[1:] or session.stats
    if not decode:
        return
    n = len(decode)
    wall = sum(s.wall for s in decode) / n * 1e3
    compute = sum(s.compute for s in decode) / n * 1e3
    hops = len(decode[0].links)
    print(
        f"{n} decode steps: {wall:.1f} ms/token, compute {compute:.1f} ms, overhead "
        f"{(wall - compute) / hops:.2f} ms per hop ({hops} parts); prefill "
        f"{session.stats[0].wall * 1e3:.1f} ms for {session.stats[0].tokens} tokens",
        file=sys.stderr,
    )
