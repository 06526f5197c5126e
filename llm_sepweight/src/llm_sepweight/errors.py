"""Exceptions raised by llm_sepweight. Every one is a :class:`SepweightError`."""

from __future__ import annotations


class SepweightError(Exception):
    """Base class of every error this package raises on bad input or a damaged directory."""


class PartSpecError(SepweightError, ValueError):
    """A part spec is malformed or does not fit the model (``"b 0-8x"``, or ``"0-40"`` of 30)."""


class FormatError(SepweightError):
    """A file or directory is not what it claims to be: missing manifest, bad header, truncated."""


class IntegrityError(FormatError):
    """A file's content does not match the sha256 or size recorded in the manifest."""


class ConversionError(SepweightError):
    """A source checkpoint cannot be converted (unknown layout, no decider, conflicting keys)."""
