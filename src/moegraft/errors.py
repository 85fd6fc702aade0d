"""Typed errors raised by the library; the CLI turns each into one line and an exit code.

Every message names the problem and the fix, in one line.
"""


class MoegraftError(Exception):
    """Base class: a problem the user can fix (bad input, impossible spec, missing file)."""


class SpecError(MoegraftError, ValueError):
    """The requested spec is impossible (e.g. top_k > experts)."""


class SourceError(MoegraftError):
    """The source checkpoint cannot be read: missing shard, corrupt header, unreadable GGUF."""


class MissingTokenizerError(SourceError):
    """A step that tokenizes text (convert's calibration) finds no tokenizer that loads."""


class UnsupportedModelError(MoegraftError):
    """No exact native MoE format exists for this architecture."""


class OutputExistsError(MoegraftError):
    """The output path exists and --overwrite was not given."""


class MissingPackageError(MoegraftError):
    """A Python package that a command needs is not installed."""


# Optional extras: the import name of each package they bring, and how to install it.
OPTIONAL_PACKAGES = {
    "lm_eval": "pip install 'moegraft[eval]'",
    "llama_cpp": "pip install 'moegraft[export]'",
}


def missing_package(e: ImportError) -> MissingPackageError:
    """One line for an import that failed: which package, and the install command that brings it."""
    name = (e.name or str(e)).split(".")[0]
    hint = OPTIONAL_PACKAGES.get(name)
    if hint:
        return MissingPackageError(f"this command needs the optional package `{name}`: {hint}")
    return MissingPackageError(
        f"the Python package `{name}` is missing (moegraft requires it); reinstall with `pip install moegraft`"
    )


class DiskFullError(MoegraftError):
    """Not enough free space for an output, checked before writing or met while writing (ENOSPC)."""


class CompareError(MoegraftError):
    """The comparison cannot be made fairly (e.g. the two models tokenise the data differently)."""
