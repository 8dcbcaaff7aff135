"""Atomic file output: a reader never sees a half-written file, a failure leaves nothing behind."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, Union

from .errors import IrepError

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise IrepError("{}: cannot write: directory {} does not exist".format(path, directory))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(directory))
    except OSError as exc:
        raise IrepError("{}: cannot write: {}".format(path, exc.strerror or exc)) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, str(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: PathLike) -> None:
    """Fail early, before any expensive work, when ``path`` cannot be created."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise IrepError("{}: cannot write: it is a directory".format(path))
    if not directory.is_dir():
        raise IrepError("{}: cannot write: directory {} does not exist".format(path, directory))
    if not os.access(str(directory), os.W_OK):
        raise IrepError("{}: cannot write: directory {} is not writable".format(path, directory))
    if path.exists() and not os.access(str(path), os.W_OK):
        raise IrepError("{}: cannot write: file is read-only".format(path))


def write_json(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def append_jsonl(path: PathLike, record: Dict[str, Any]) -> None:
    """Append one JSON record as a line (run logs)."""
    with open(str(path), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def trim_jsonl(path: PathLike, keep: Callable[[Dict[str, Any]], bool]) -> None:
    """Keep only the records ``keep`` accepts, dropping lines a kill cut short (resumed runs)."""
    path = Path(path)
    if not path.exists():
        return
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if keep(record):
            lines.append(line)
    with atomic_write(path, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))


@contextlib.contextmanager
def no_typed_storage_warning() -> Iterator[None]:
    """Hide the one warning torch 2.0's ``torch.load(weights_only=True)`` raises about its own
    internals ("TypedStorage is deprecated"); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        yield
