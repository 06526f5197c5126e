"""The ``llm-partial-run`` command: one sub-command per module of :mod:`llm_partial_run.commands`.

Each sub-command lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``,
imported only when used, so ``serve`` never pays for the HTTP stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import PartialRunError

COMMANDS = {
    "serve": "serve a part of a sepweight model on a node",
    "generate": "generate text with a pipeline of nodes or a local model",
    "api": "an OpenAI-compatible HTTP endpoint over nodes or a local model",
    "demo": "convert the embedded SmolLM2, start two nodes and answer a prompt",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: every sub-command's module adds its own parser."""
    parser = argparse.ArgumentParser(
        prog="llm-partial-run",
        description="Run parts of a large language model: serve them on nodes, chain them, "
        "stream layers that do not fit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        module = _module(name)
        if module is not None:
            module.add_parser(sub, name, summary)
    return parser


def _module(name: str):
    try:
        return importlib.import_module(f"llm_partial_run.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"llm_partial_run.commands.{name}":
            return None  # that sub-command is not built (yet)
        raise


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors are one line on stderr)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (PartialRunError, OSError, ValueError) as exc:
        print(f"llm-partial-run {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
