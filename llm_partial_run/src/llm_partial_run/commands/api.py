"""``llm-partial-run api (--nodes HOST:PORT,... | --model DIR)``: an OpenAI-compatible HTTP
endpoint over a pipeline of nodes or a local model.

Serves ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` (streaming as server-sent
events) until interrupted; one access-log line per request on stderr. Needs the ``api`` extra
(``pip install 'llm_partial_run[api]'``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import PartialRunError
from ..streaming import add_packed_arguments

DESCRIPTION = (
    "An OpenAI-compatible HTTP endpoint (/v1/chat/completions, /v1/completions, /v1/models; "
    "streaming as server-sent events) over a pipeline of nodes or a local model. Prints "
    "'ready http://HOST:PORT' on stdout once it accepts connections."
)


def add_parser(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    """The ``api`` sub-command's arguments."""
    p = sub.add_parser(name, help=summary, description=DESCRIPTION)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--nodes", help="the nodes' addresses, HOST:PORT,HOST:PORT,...")
    where.add_argument("--model", type=Path, help="a sepweight directory, run in this process")
    p.add_argument("--resident-layers", type=int, metavar="K",
                   help="with --model: stream layer weights, at most K on the device")  # fmt: skip
    add_packed_arguments(p)
    p.add_argument("--device", default=None, help="with --model: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="with --model: float32, bfloat16, float16")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key-file", type=Path, help="file holding the key clients must send")
    p.add_argument("--max-concurrency", type=int, default=8, metavar="N",
                   help="requests decoded together (default 8)")  # fmt: skip
    p.add_argument("--max-queue", type=int, metavar="N",
                   help="requests waiting beyond those; more get 429 (default: N)")  # fmt: skip
    p.add_argument("--context", type=int, metavar="TOKENS",
                   help="prompt + completion tokens per request (default: <= 2048)")  # fmt: skip
    p.add_argument("--model-name", help="the model id clients name (default: directory name)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="tokenizer directory (default: the model's, or a node's)")  # fmt: skip
    p.add_argument("--token-file", type=Path, help="with --nodes: the nodes' shared token")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="with --nodes: seconds a node may take per call (default 60)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import torch

    from ..api import read_api_key, serve_api
    from ..session import LocalModel, Pipeline
    from ..text import Tokenizer
    from .serve import read_token

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nodes is None and (args.token_file or args.timeout != 60.0):
        raise PartialRunError("--token-file and --timeout go with --nodes")
    given = args.resident_layers or args.device or args.dtype or args.packed_dir or args.no_pack
    if args.model is None and given:
        raise PartialRunError(
            "--resident-layers, --packed-dir, --no-pack, --device and --dtype go with --model"
        )
    logging.getLogger("llm_partial_run.api").setLevel(logging.INFO)  # the access log
    if args.model is not None:
        source = LocalModel(args.model, device=args.device, dtype=args.dtype,
                            resident_layers=args.resident_layers, pack=not args.no_pack,
                            packed_dir=args.packed_dir)  # fmt: skip
    else:
        nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
        source = Pipeline(nodes, token=read_token(args.token_file), timeout=args.timeout)
    try:
        serve_api(
            source, host=args.host, port=args.port,
            tokenizer=Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None,
            model_name=args.model_name, context_len=args.context,
            max_concurrency=args.max_concurrency, max_queue=args.max_queue,
            api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
            on_ready=lambda url: print(f"ready {url}", flush=True),
        )  # fmt: skip
    finally:
        source.close()
    return 0
