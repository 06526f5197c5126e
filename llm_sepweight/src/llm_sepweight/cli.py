"""The ``llm-sepweight`` command (also ``python -m llm_sepweight``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .convert import convert
from .errors import SepweightError
from .loader import files, verify
from .manifest import read_manifest

EPILOG = """\
part specs: 'f' full model, 'b' begin (embeddings), 'e' end (final norm + head), 'a-b' layers
a..b-1 (half-open); e.g. 'b 0-8', '8-16', '16-30 e'.

examples:
  llm-sepweight convert ./Llama-3.2-1B ./llama-sw --dtype bf16
  llm-sepweight convert model.gguf ./model-sw
  llm-sepweight info ./llama-sw
  llm-sepweight verify ./llama-sw
  rsync -R $(llm-sepweight files ./llama-sw --part '8-16') node2:/models/
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line (one sub-command per action)."""
    parser = argparse.ArgumentParser(
        prog="llm-sepweight",
        description="Convert checkpoints to sepweight (one safetensors file per layer) and "
        "inspect, verify or list the files of such a directory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a checkpoint to a sepweight directory")
    p.add_argument("src", help="Hugging Face model directory, .gguf file or old .pth directory")
    p.add_argument("out", help="output directory (created; a killed run resumes when re-run)")
    p.add_argument("--dtype", help="convert floating-point weights: float32, bfloat16, float16")
    p.add_argument("--arch", help="model package to use (default: from the checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("info", help="show what a sepweight directory holds")
    p.add_argument("dir")

    p = sub.add_parser("verify", help="re-hash every file against the manifest")
    p.add_argument("dir")

    p = sub.add_parser("files", help="list the files a part needs, one path per line")
    p.add_argument("dir")
    p.add_argument("--part", required=True, help="part spec, e.g. 'b 0-8' or '16-30 e'")
    return parser


def _info(directory: str) -> None:
    m = read_manifest(directory)
    weights = {k: v for k, v in m.files.items() if k.endswith(".safetensors")}
    others = sorted(set(m.files) - set(weights))
    print(f"directory   {Path(directory).resolve()}")
    print(f"arch        {m.arch}")
    print(f"layers      {m.num_layers}")
    print(f"dtype       {m.dtype}")
    print(f"weights     {len(weights)} files, {m.weight_bytes / 2**20:.1f} MiB")
    print(f"other files {', '.join(others) or 'none'}")
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if key in m.config:
            print(f"{key:<11} {m.config[key]}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        if args.command == "convert":
            show = not args.quiet and sys.stderr.isatty()
            m = convert(args.src, args.out, dtype=args.dtype, arch=args.arch, progress=show)
            print(f"wrote {args.out}: {m.arch}, {m.num_layers} layers, {m.dtype}, "
                  f"{len(m.files)} files, {m.weight_bytes / 2**20:.1f} MiB")  # fmt: skip
        elif args.command == "info":
            _info(args.dir)
        elif args.command == "verify":
            m = verify(args.dir, progress=sys.stderr.isatty())
            print(f"ok: {len(m.files)} files match the manifest")
        elif args.command == "files":
            for path in files(args.dir, args.part):
                print(path)
    except SepweightError as exc:
        print(f"llm-sepweight: error: {exc}", file=sys.stderr)
        return 1
    return 0
