"""Exceptions raised by llm_sepweight. Every one is a :class:`SepweightError`."""

from __future__ import annotations


class SepweightError(Exception):
    """Base class of every error this package raises on bad input or a damaged directory.

    The message says what was wrong and what to do, in the words of the Python API. Where the
    ``llm-sepweight`` command line words the remedy differently (``--arch`` for ``arch=``),
    ``cli_message`` holds that version; otherwise it is the message itself.
    """

    def __init__(self, message: str = "", *, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message if cli_message is not None else message


class PartSpecError(SepweightError, ValueError):
    """A part spec is malformed or does not fit the model (``"b 0-8x"``, or ``"0-40"`` of 30)."""


class FormatError(SepweightError):
    """A file or directory is not what it claims to be: missing manifest, bad header, truncated."""


class IntegrityError(FormatError):
    """A file's content does not match the sha256 or size recorded in the manifest."""


class ConversionError(SepweightError):
    """A source checkpoint cannot be converted (unknown layout, no decider, conflicting keys).

    A model package that refuses a checkpoint (its hooks raise ``ValueError``, as
    ``LlamaModelError`` and ``FalconModelError`` are) surfaces as this error, naming the package.
    """
