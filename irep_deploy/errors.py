"""Errors a user can act on.

Every failure caused by input (a file, an argument, a mismatch between two files) is raised as an
:class:`IrepError` whose message is one plain sentence that names the file or object at fault. The
CLI prints that sentence and exits with the error's ``exit_code`` (README "Exit codes"); anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


class IrepError(Exception):
    """Base class: a problem with the user's input, reported in one line."""

    exit_code = 1


class UsageError(IrepError):
    """A flag or argument is unusable as given (bad value, an output that is an input): exit 2."""

    exit_code = 2


class ArchFormatError(IrepError):
    """An architecture-code file is malformed (message carries file:line)."""


class RecordError(IrepError):
    """A file a search writes (log.jsonl, alpha_beta.jsonl, population.json) is malformed (file:line)."""


class PlotError(IrepError):
    """An input of a figure is missing or malformed, or the figures cannot be written."""


class ArchMismatchError(IrepError):
    """An architecture code does not fit the model or checkpoint it is applied to."""


class CheckpointError(IrepError):
    """A checkpoint is missing, unsafe, corrupt, or does not fit its model."""


class VerificationError(IrepError):
    """Two computations that must agree (fused vs multi-branch, ONNX vs torch) do not."""

    exit_code = 3


class Terminated(BaseException):
    """SIGTERM arrived while an atomic write was in progress (raised so the temp file is removed).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` in library code lets it pass.
    """

    exit_code = 143
