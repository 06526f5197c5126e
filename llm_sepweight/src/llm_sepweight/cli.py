"""The ``llm-sepweight`` command (also ``python -m llm_sepweight``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from .convert import convert_or_reuse
from .errors import SepweightError
from .loader import files, verify
from .manifest import Manifest, read_manifest

EPILOG = """\
part specs: 'f' full model, 'b' begin (embeddings), 'e' end (final norm + head), 'a-b' layers
a..b-1 (half-open); e.g. 'b 0-8', '8-16', '16-30 e'.

examples:
  llm-sepweight convert ./Llama-3.2-1B ./llama-sw --dtype bf16
  llm-sepweight convert model.gguf ./model-sw
  llm-sepweight info ./llama-sw
  llm-sepweight verify ./llama-sw
  rsync -R $(llm-sepweight files ./llama-sw --part '8-16') node2:/models/
  llm-sepweight verify ./llama-sw --part '8-16'     # on node2: checks the files it holds

errors are one line on stderr: exit status 1 (2 for a usage error, 130 when interrupted).
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line (one sub-command per action)."""
    parser = _Parser(
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
    p.add_argument(
        "out",
        help="output directory (created; a killed run resumes when re-run, a finished one with "
        "an unchanged source is up to date and not redone)",
    )
    p.add_argument("--dtype", help="convert floating-point weights: float32, bfloat16, float16")
    p.add_argument("--arch", help="model package to use (default: from the checkpoint)")
    p.add_argument("--force", action="store_true", help="convert again even when up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("info", help="show what a sepweight directory holds")
    p.add_argument("dir")

    p = sub.add_parser("verify", help="re-hash the files against the manifest")
    p.add_argument("dir")
    p.add_argument("--part", help="check only the files this part needs (those `files` lists)")

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


def _summary(m: Manifest) -> str:
    return (f"{m.arch}, {m.num_layers} layers, {m.dtype}, {len(m.files)} files, "
            f"{m.weight_bytes / 2**20:.1f} MiB")  # fmt: skip


def _convert(args: argparse.Namespace) -> None:
    show = not args.quiet and sys.stderr.isatty()
    m, written = convert_or_reuse(
        args.src, args.out, dtype=args.dtype, arch=args.arch, progress=show, force=args.force
    )
    if written:
        print(f"wrote {args.out}: {_summary(m)}")
    else:
        print(f"up to date: {args.out} ({_summary(m)}); the source and the options are "
              "unchanged, --force converts again")  # fmt: skip


def _verify(args: argparse.Namespace) -> None:
    m = verify(args.dir, part=args.part, progress=sys.stderr.isatty())
    if args.part is None:
        print(f"ok: {len(m.files)} files match the manifest")
    else:
        count = len(files(args.dir, args.part)) - 1
        print(f"ok: part {args.part!r}: its {count} files match the manifest")


def _run(args: argparse.Namespace) -> None:
    if args.command == "convert":
        _convert(args)
    elif args.command == "info":
        _info(args.dir)
    elif args.command == "verify":
        _verify(args)
    elif args.command == "files":
        for path in files(args.dir, args.part):
            print(path)


def _fail(message: str, code: int = 1) -> int:
    print(f"llm-sepweight: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted).

    What a user can cause is reported as one line on stderr, never a traceback: llm_sepweight's
    own errors (a model package refusing a checkpoint arrives as one of them, see
    :class:`ConversionError`) and the operating system's (a path that cannot be read or
    written, a full disk). Anything else is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        _run(args)
        sys.stdout.flush()
    except SepweightError as exc:
        return _fail(getattr(exc, "cli_message", None) or str(exc))
    except BrokenPipeError:  # the reader went away (`... | head`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        resumes = " (run it again: the conversion resumes where it stopped)"
        return _fail("interrupted" + (resumes if args.command == "convert" else ""), 130)
    return 0
