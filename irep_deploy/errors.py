"""Errors a user can act on, all in one place.

Every failure caused by input (a file, an argument, a mismatch between two files) is raised as an
:class:`IrepError` whose message is one plain sentence that names the file or object at fault. The
CLI prints that sentence and exits with the error's ``exit_code`` (README "Exit codes"); anything
else is a bug and keeps its traceback.

An error that translates a library's exception (torch, onnx, onnxruntime, TensorRT, the OS) quotes
the first line of it (:func:`first_line`) and is raised ``from`` it: the user reads one line, while
``--debug`` (and a Python caller's traceback) shows the whole cause with its frames.
"""
from __future__ import annotations

import threading


class IrepError(Exception):
    """Base class: a problem with the user's input, reported in one line."""

    exit_code = 1


class UsageError(IrepError, ValueError):
    """A flag or argument is unusable as given (bad value, an output that is an input): exit 2.

    Also a ValueError, the exception Python callers expect for an argument out of range."""

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


class DataError(IrepError):
    """A dataset is missing, incomplete or unreadable, or a split/option does not make sense."""


class NotAvailableError(IrepError):
    """What the command needs is not on this machine: a package (TensorRT, onnxruntime, onnx, an optional
    extra), a CUDA GPU, an onnxruntime provider, a DLA core, or the device profile asked for. Exit 4,
    apart from a bad input file (1): the rule is that no other input would help on this machine, while
    another file would help a code-1 error (README "Exit codes", docs/deploy.md)."""

    exit_code = 4


class EngineMismatchError(IrepError):
    """An engine was built by another TensorRT version or on another GPU: a file that does not fit this
    machine (exit 1), since an engine rebuilt here runs; not a missing capability (4)."""


class DeviceMismatchError(NotAvailableError):
    """The machine is not the device the user asked to benchmark (exit 4: no input helps here)."""


class VerificationError(IrepError):
    """Two computations that must agree (fused vs multi-branch, ONNX vs torch) do not."""

    exit_code = 3


class TrainingDiverged(IrepError):
    """The loss became NaN or infinite; the last good state is kept."""

    exit_code = 2


class StdoutError(IrepError):
    """Standard output cannot be written: its reader is gone (EPIPE: the CLI then exits quietly, 141,
    as a Unix tool killed by SIGPIPE) or its device is full (/dev/full: one line, exit 1)."""

    def __init__(self, message: str, broken_pipe: bool) -> None:
        super().__init__(message)
        self.broken_pipe = broken_pipe


class Terminated(BaseException):
    """SIGTERM arrived during a command (the CLI's handler) or an atomic write (raised so that cleanup
    runs and the temp file is removed).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` in library code lets it pass.
    """

    exit_code = 143


# Ctrl-C seen by the CLI's SIGINT handler. Remembered because library code can swallow the
# KeyboardInterrupt the handler raises (a C++ callback into Python, a ``hasattr`` from C, an import
# that reports failure as ImportError); the long loops then raise it again at their next step.
# SIGTERM likewise: its Terminated can be swallowed where a KeyboardInterrupt can.
_INTERRUPT = threading.Event()
_TERMINATE = threading.Event()
note_interrupt = _INTERRUPT.set
interrupt_noted = _INTERRUPT.is_set
note_terminate = _TERMINATE.set
terminate_noted = _TERMINATE.is_set


def forget_interrupts() -> None:
    """Forget a noted Ctrl-C and SIGTERM (the CLI, when a command ends)."""
    _INTERRUPT.clear()
    _TERMINATE.clear()


def raise_if_interrupted() -> None:
    """Raise Terminated or KeyboardInterrupt if SIGTERM or Ctrl-C arrived and was swallowed on its way
    up: called once per step of every long loop (training, evaluation, search scoring, latency timing)."""
    if _TERMINATE.is_set():
        raise Terminated("terminated (SIGTERM)")
    if _INTERRUPT.is_set():
        raise KeyboardInterrupt


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``exc`` (its type name when it has no message), cut to ``limit``
    characters: what a one-line message quotes of a foreign error it is raised from."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on or hide (newline, ESC, other control and
    format characters, undecodable bytes of a file name) written as its escape (``\\n``, ``\\x1b``):
    an error line stays one line, and a file name cannot move the cursor or recolour the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
