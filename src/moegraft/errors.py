"""Typed errors raised by the library; the CLI turns each into one line and an exit code.

Every message names the problem and the fix, in one line.
"""


class MoegraftError(Exception):
    """Base class: a problem the user can fix (bad input, impossible spec, missing file)."""


class SpecError(MoegraftError, ValueError):
    """The requested spec is impossible (e.g. top_k > experts)."""


class SourceError(MoegraftError):
    """The source checkpoint cannot be read: missing shard, corrupt header, unreadable GGUF."""


class UnsupportedModelError(MoegraftError):
    """No exact native MoE format exists for this architecture."""


class OutputExistsError(MoegraftError):
    """The output path exists and --overwrite was not given."""
