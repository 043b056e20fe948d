"""Errors of the checkpoint tools."""

from __future__ import annotations

__all__ = ["ConversionError"]


class ConversionError(ValueError):
    """Bad input to a checkpoint tool (missing / truncated shard, unknown or misshapen tensor, a layout
    the model cannot be split into, an output that already exists ...). The message names the file,
    tensor or option and says what to change; the CLI prints it as one line."""
