"""Progress of the long steps, one way for every command: tqdm on stderr, off with ``--quiet``.

stdout carries results only (``irep-deploy show ... | head``, ``bench ... > table.txt``), so a bar
always goes to stderr. On a terminal a bar shows at once and is erased when its step ends. Where
stderr is not a terminal (a log file, CI, a test's capture) a bar appears only once its step has run
``DELAY_S`` seconds, so a quick step prints nothing and an error line stays the only line; it redraws
at most every ``LOG_INTERVAL_S`` seconds and its last state stays as a line of the log, instead of a
stream of carriage returns that is then erased. docs/progress.md lists the steps that show one
(checked by tests/test_progress.py).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional, Sequence

# Seconds a step runs before its bar appears in a log: quick steps stay quiet there, and no step
# goes much over 10 s without a sign of life (the limit). The first draw also waits for
# LOG_INTERVAL_S: tqdm counts that from the bar's start.
DELAY_S = 10.0
# Redraw interval where stderr is not a terminal: a log gets a few lines per minute, not hundreds.
LOG_INTERVAL_S = 10.0
# Set to anything but "" or "0": every command as with --quiet (a script or a CI job that wants its
# stderr to hold errors only, whatever the machine's load does to the steps' durations).
QUIET_ENV = "IREP_DEPLOY_QUIET"


def quiet_by_env() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def bar(iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "",
        enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar on stderr over ``iterable`` (or updated by hand up to ``total``); a no-op when not
    ``enabled`` (``--quiet``, or a rank other than 0). Use it as a context manager or close it: an
    error then leaves no half-drawn bar on a terminal."""
    from tqdm import tqdm

    terminal = _is_terminal(sys.stderr)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled or quiet_by_env(),
                leave=not terminal, dynamic_ncols=terminal, ascii=None if terminal else True,
                delay=0 if terminal else DELAY_S,
                mininterval=0.1 if terminal else LOG_INTERVAL_S)


class Stages:
    """A bar counted in the named stages of one step (load, export, verify, ...): the running stage's
    name shows after the count, so a long single call (an export, a TensorRT build) is named while it
    runs. ``with Stages(desc, names, enabled) as stage: stage("load"); ...; stage("write")``."""

    def __init__(self, desc: str, names: Sequence[str], enabled: bool = True) -> None:
        self.bar = bar(total=len(names), desc=desc, enabled=enabled, unit="step")
        self.started = False

    def __call__(self, name: str) -> None:
        terminal = _is_terminal(sys.stderr)
        self.bar.set_postfix_str(name, refresh=terminal and not self.started)
        if self.started:  # the stage before this one is done
            self.bar.update()
        self.started = True

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None and self.started:
            self.bar.set_postfix_str("done", refresh=False)
            self.bar.update()
        self.bar.close()
