"""``llm-partial-run serve DIR --part SPEC``: serve one part of a model on a node.

Prints one line ``ready HOST:PORT`` on stdout once it accepts calls; stops cleanly on SIGINT or
SIGTERM. A part whose files do not match the manifest refuses to start (one line on stderr).
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path

from ..errors import PartialRunError
from ..streaming import add_packed_arguments


def add_parser(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    """The ``serve`` sub-command's arguments."""
    p = sub.add_parser(name, help=summary, description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path, help="the sepweight directory")
    p.add_argument("--part", default="f", help="part spec, e.g. 'b 0-15' (default: f, the whole)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: a free one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: stored)")
    p.add_argument("--token-file", type=Path, help="file holding the shared token")
    p.add_argument("--tls-cert", type=Path, help="TLS certificate (PEM); needs --tls-key")
    p.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the part's files")
    p.add_argument("--resident-layers", type=int, metavar="K",
                   help="stream the layers' weights, at most K on the device at once")  # fmt: skip
    add_packed_arguments(p)
    p.add_argument("--max-sessions", type=int, default=64, help="sessions at once (default 64)")
    p.add_argument(
        "--max-cache-bytes",
        type=int,
        help="KV-cache bytes of all sessions, at most "
        "(default: 90%% of the memory free on the device at start)",
    )
    p.add_argument("--session-ttl", type=float, default=600.0,
                   help="seconds an idle session lives (default 600)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")


def read_token(path: Path | None) -> str | None:
    """The token in ``path`` (surrounding whitespace stripped), or None."""
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise PartialRunError(f"token file {path} is empty")
    return token


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    import torch

    from llm_sepweight import SepweightError

    from ..node import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise PartialRunError("--tls-cert and --tls-key go together")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)

    def ready(address: tuple[str, int]) -> None:
        print(f"ready {address[0]}:{address[1]}", flush=True)

    try:
        serve(
            args.directory, args.part, host=args.host, port=args.port,
            token=read_token(args.token_file), ssl_context=context, on_ready=ready,
            device=args.device, dtype=args.dtype, verify=not args.no_verify,
            resident_layers=args.resident_layers, pack=not args.no_pack,
            packed_dir=args.packed_dir, max_sessions=args.max_sessions,
            max_cache_bytes=args.max_cache_bytes, session_ttl=args.session_ttl,
        )  # fmt: skip
    except SepweightError as exc:
        print(f"llm-partial-run serve: error: {exc}", file=sys.stderr)
        return 1
    return 0
