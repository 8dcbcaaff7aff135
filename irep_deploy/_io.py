"""File input and output that cannot lose or half-write a file.

OS errors are translated here, and only here (:func:`os_error`): a full disk, a file-size limit, a
read-only file system, a denied permission or an I/O error is one line naming the path and the cause
in plain words.

Atomic writes: a reader never sees a half-written file; a failure, Ctrl-C or SIGTERM leaves nothing
behind. The temporary file is ``.NAME.PID.XXXXXXXX.tmp`` beside NAME; one left by a run killed with
SIGKILL is removed by the next write of NAME once its PID is no longer a live process on this machine
(or, for a name without a PID, once it is more than a minute old). Readers are bounded in size, and
outputs are refused when they are one of the command's inputs.

Every output gets its missing parent directories here, the same way for every command: a file when it
is written (:func:`make_parents`, removed again when the write fails), a run directory when it is
made (:func:`run_directory`); :func:`check_writable` checks the nearest existing directory beforehand.

Only regular files are read or written: an input that is a FIFO, a device, a socket or a directory
is refused before it is opened (a FIFO would block, /dev/zero never ends), and so is an existing
output of that kind (a rename would replace /dev/null or a FIFO with a regular file).

A run directory (train, search, demo) has one writer at a time: :func:`run_directory` holds an
advisory lock on its ``.lock`` file (``flock``: the kernel drops it when the holder dies, so a lock
is never stale) and refuses a second writer with one line naming the holder. A new run writes only
into a new or empty directory, a resumed one only into a directory without links or special files,
and run logs are appended without following a link (:func:`append_jsonl`).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type, Union

from .errors import IrepError, StdoutError, Terminated, UsageError, first_line, note_terminate

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there (docs/formats.md)
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, "os.PathLike[str]"]

STALE_TMP_SECONDS = 60.0  # a temp file without a PID part older than this is a leftover


def quote(text: Any, limit: int = 80) -> str:
    """``repr`` of ``text`` cut to about ``limit`` characters, for error lines about untrusted input."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters, marked with '...' when cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut) + "..."


# The cause part of a one-line OS error, in plain words (README "Exit codes"); others read as strerror.
_OS_CAUSES = {
    errno.ENOSPC: "disk full (no space left on device)",
    getattr(errno, "EDQUOT", -1): "disk quota exceeded",
    errno.EFBIG: "file too large (over the file-size limit of this process, ulimit -f, or of the file system)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EPIPE: "broken pipe (the reader is gone)",
    errno.EIO: "I/O error (a failing disk or device)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files on this machine",
    errno.ENXIO: "no such device or address",
    errno.ETXTBSY: "text file busy",
    errno.EBUSY: "device or resource busy",
}
# Faults of the machine rather than of a path: translated even when a library wrapped them in its own
# error (torch.save reports ENOSPC as "RuntimeError: unexpected pos", raised while handling the OSError).
_ENVIRONMENT_FAULTS = {errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG, errno.EROFS, errno.EIO}
_WRITE_FAULTS = _ENVIRONMENT_FAULTS | {errno.EACCES, errno.EPERM}


def os_cause(err: OSError) -> str:
    """What went wrong, in plain words (no path): "disk full (no space left on device)"."""
    cause = _OS_CAUSES.get(err.errno) if err.errno is not None else None
    if cause is None:
        text = err.strerror or first_line(err)
        cause = text[:1].lower() + text[1:]
    return cause


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError ``exc`` is, or was raised from or while handling (a library's wrapper), if any."""
    seen = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _errno_in_text(exc: BaseException) -> Optional[OSError]:
    """The OS error a Rust library reports only in its message (safetensors' ``save_file``: "I/O error:
    No space left on device (os error 28)", or "Os { code: 28, ..." on older versions)."""
    m = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(exc))
    if m is None:
        return None
    number = int(m.group(1) or m.group(2))
    return OSError(number, os.strerror(number))


def os_error(exc: BaseException, path: PathLike, action: str = "cannot write") -> IrepError:
    """The one-line error for an OS error while acting on ``path``: "PATH: cannot write: disk full (...)"."""
    err = os_error_in(exc)
    cause = os_cause(err) if err is not None else first_line(exc)
    return IrepError("{}: {}: {}".format(path, action, cause))


def escaped_os_error(exc: BaseException) -> Optional[IrepError]:
    """The CLI's last resort for an OS error no reader or writer translated: an OSError (named by its
    file when it has one), or a fault of the machine (full disk, I/O error) a library wrapped. None for
    anything else, which is a bug and keeps its traceback."""
    err = os_error_in(exc)
    if err is None or (err is not exc and err.errno not in _ENVIRONMENT_FAULTS):
        return None
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return IrepError("{}: {}".format(" -> ".join(names), os_cause(err)) if names else os_cause(err))


@contextlib.contextmanager
def writing(path: PathLike) -> Iterator[None]:
    """Within the block, a fault of the machine (full disk, file-size limit, read-only or denied, I/O
    error) met by a library's own writer of ``path`` (TensorBoard's event files) is one IrepError
    naming ``path``; anything else passes unchanged."""
    try:
        yield
    except Exception as exc:
        err = os_error_in(exc)
        if isinstance(exc, IrepError) or err is None or err.errno not in _WRITE_FAULTS:
            raise
        raise os_error(exc, path) from exc


@contextlib.contextmanager
def quiet_background_faults() -> Iterator[None]:
    """While the block runs, a thread that dies of a fault of the machine (TensorBoard's writer thread
    on a full disk) prints no traceback: the command meets the same fault and reports it in one line."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        err = os_error_in(args.exc_value) if args.exc_value is not None else None
        if err is None or err.errno not in _WRITE_FAULTS:
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _write_fault(exc: BaseException, tmp: str, directory: Path) -> Optional[str]:
    """The cause of a failed write when the machine is at fault, else None (a bug or an IrepError).

    Asked before the temp file is removed: removing it frees the space whose lack is the cause."""
    if isinstance(exc, IrepError) or not isinstance(exc, Exception):
        return None
    err = os_error_in(exc) or _errno_in_text(exc)
    if err is not None:  # the write's own error has no file name (the rename's names the temp file)
        return os_cause(err) if err.filename in (None, tmp) else None
    with contextlib.suppress(OSError, ValueError, ImportError):
        if os.statvfs(str(directory)).f_bavail == 0:  # a writer that dropped the errno (a C++ library)
            return _OS_CAUSES[errno.ENOSPC]
        import resource
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and os.stat(tmp).st_size >= limit:
            return _OS_CAUSES[errno.EFBIG]
    return None


def read_bounded(path: PathLike, limit: int, what: str, error: Type[IrepError] = IrepError) -> bytes:
    """The bytes of ``path``, refused (one line naming it) when it holds more than ``limit`` bytes.

    Reads at most ``limit + 1`` bytes of a regular file; a FIFO or device is refused unopened.
    """
    p = Path(path)
    regular_input(p, what, error)
    try:
        # O_NONBLOCK: a FIFO put in its place since the check must not block the open
        fd = os.open(str(p), os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            _refuse_special(p, st.st_mode, what, error)
            if st.st_size > limit:  # refused unread: a reader never holds more than its limit
                raise error("{}: larger than {:,} bytes; not {}".format(p, limit, what))
            data = handle.read(limit + 1)
    except FileNotFoundError as exc:
        raise error("{}: no such file".format(p)) from exc
    except OSError as exc:
        raise error("{}: cannot read: {}".format(p, os_cause(exc))) from exc
    if len(data) > limit:
        raise error("{}: larger than {:,} bytes; not {}".format(p, limit, what))
    return data


_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SPECIAL_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` is, for messages ("a FIFO", "a character device", ...)."""
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def _refuse_special(path: Path, mode: int, what: str, error: Type[IrepError]) -> None:
    if not stat.S_ISREG(mode):
        raise error("{}: is {}, not {}".format(path, file_kind(mode), what))


def regular_input(path: PathLike, what: str, error: Type[IrepError] = IrepError) -> None:
    """Refuse an input that exists and is not a regular file (a FIFO would block the reader, a device
    such as /dev/zero never ends), before anything opens it; ``what`` names the expected file
    ("a checkpoint"). A missing or unreadable path is left to the reader's own message."""
    try:
        mode = os.stat(str(path)).st_mode
    except (OSError, ValueError):
        return
    _refuse_special(Path(path), mode, what, error)


def check_output_kind(path: PathLike) -> None:
    """Refuse an existing output that is not a regular file: replacing it would destroy a FIFO, a
    device (/dev/null) or a socket, and a directory cannot be replaced by a file."""
    try:
        mode = os.stat(str(path)).st_mode
    except (OSError, ValueError):
        return
    if stat.S_ISDIR(mode):
        raise IrepError("{}: cannot write: it is a directory".format(path))
    if not stat.S_ISREG(mode):
        raise IrepError("{}: cannot write: it is {}, not a regular file; name a file".format(path, file_kind(mode)))


def read_json(path: PathLike, limit: int, what: str, error: Type[IrepError] = IrepError) -> Any:
    """The JSON value in ``path`` (at most ``limit`` bytes); one line naming the file when it is not JSON."""
    text = _read_utf8(path, limit, what, error)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error("{}: not valid JSON: {}".format(path, clip(str(exc), 100))) from exc


def read_json_lines(path: PathLike, limit: int, what: str,
                    error: Type[IrepError] = IrepError) -> List[Tuple[int, Dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSON-lines file (at most ``limit`` bytes).

    A last line without its newline that does not parse is skipped: a writer is still appending it.
    """
    lines = _read_utf8(path, limit, what, error).split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            if lineno == len(lines):
                continue
            raise error("{}:{}: not valid JSON: {}".format(path, lineno, clip(str(exc), 100))) from exc
        if not isinstance(record, dict):
            raise error("{}:{}: expected a JSON object".format(path, lineno))
        records.append((lineno, record))
    return records


def _read_utf8(path: PathLike, limit: int, what: str, error: Type[IrepError]) -> str:
    try:
        return read_bounded(path, limit, what, error).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error("{}: not UTF-8 text".format(path)) from exc


MAX_ARCH_BYTES = 1 << 20  # the largest real architecture code (resnet50, 16 ops) is about 2 KB


def read_arch_bytes(path: PathLike) -> bytes:
    """The bytes of an architecture-code file, bounded; here (no torch import) so that `show` of a
    huge file or /dev/zero answers before torch is loaded."""
    from .errors import ArchFormatError
    return read_bounded(path, MAX_ARCH_BYTES, "an architecture code", ArchFormatError)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and `..` resolved); also for files not written yet."""
    try:
        return os.path.samefile(str(a), str(b))  # hard links, symlinks
    except OSError:
        return os.path.realpath(str(a)) == os.path.realpath(str(b))  # `..`, symlinked directories


def check_not_input(path: PathLike, inputs: Iterable[Optional[PathLike]], flag: str = "output") -> None:
    """Refuse an output that is (or resolves to) one of the command's inputs, before any work."""
    for inp in inputs:
        if inp is not None and same_file(Path(path), Path(inp)):
            raise UsageError("{}: {} is the input {}; writing it would destroy that input, choose another path"
                             .format(path, flag, inp))


def check_writable(path: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> None:
    """Fail early, before any expensive work, when ``path`` cannot be created or is an input."""
    check_not_input(path, inputs)
    path = Path(path)
    check_output_kind(path)
    directory = _existing_ancestor(path)  # missing directories are created when the file is written
    if not os.access(str(directory), os.W_OK):
        raise IrepError("{}: cannot write: directory {} is not writable{}".format(path, directory,
                                                                              _read_only_fs(directory)))
    if path.exists() and not os.access(str(path), os.W_OK):
        raise IrepError("{}: cannot write: file is read-only{}".format(path, _read_only_fs(directory)))


def _existing_ancestor(path: Path) -> Path:
    """The nearest directory above ``path`` that exists; one IrepError when a file stands in the way."""
    probe = path.parent if str(path.parent) else Path(".")
    while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise IrepError("{}: cannot write: {} is {}, not a directory".format(
            path, probe, file_kind(os.stat(str(probe)).st_mode) if probe.exists() else "a broken link"))
    return probe


def make_parents(path: PathLike) -> Optional[Path]:
    """Create the missing directories above the output file ``path``, as ``mkdir -p`` of its directory:
    every command's outputs get their parents here (through :func:`atomic_write`), as ``search`` always
    created its run directory. The highest directory created (None: none), for :func:`remove_parents`."""
    path = Path(path)
    return _make_directories(path.parent, path, "cannot create its directory") if str(path.parent) else None


def remove_parents(path: PathLike, top: Optional[Path]) -> None:
    """Remove the directories :func:`make_parents` created for ``path`` up to ``top``, those left empty
    (a failed write leaves no empty directories; one another writer filled meanwhile stays)."""
    if top is None:
        return
    directory = Path(path).parent
    while True:
        try:
            directory.rmdir()
        except OSError:
            return
        if directory == top:
            return
        directory = directory.parent


def _read_only_fs(directory: Path) -> str:
    """" (read-only file system)" when that is why ``directory`` cannot be written, else ""."""
    try:
        return " (read-only file system)" if os.statvfs(str(directory)).f_flag & os.ST_RDONLY else ""
    except (OSError, AttributeError):
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale_temps(path: PathLike) -> None:
    """Remove temp files of earlier, killed writes of ``path`` (our own name pattern only)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.(?:(\d+)\.)?[A-Za-z0-9_]{6,}\.tmp$")
    try:
        names = os.listdir(str(directory))
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        tmp = directory / name
        with contextlib.suppress(OSError):
            if m.group(1) is not None:
                stale = int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))
            else:
                stale = time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS
            if stale and tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (so cleanup runs); then the old handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        note_terminate()  # as the CLI's handler does, should a library swallow the exception
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception (Ctrl-C and SIGTERM included) the temporary file is removed and ``path`` is
    left as it was; a fault of the machine (full disk, file-size limit, I/O error, also when a library
    wrapped it in its own error) becomes one IrepError naming ``path``.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    check_output_kind(path)
    top = make_parents(path)
    remove_stale_temps(path)
    with _sigterm_raises():
        try:
            fd, tmp = tempfile.mkstemp(prefix=".{}.{}.".format(path.name, os.getpid()), suffix=".tmp",
                                       dir=str(directory))
        except OSError as exc:
            remove_parents(path, top)
            raise os_error(exc, path) from exc
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
            with os.fdopen(fd, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, str(path))
        except BaseException as exc:
            fault = _write_fault(exc, tmp, directory)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            remove_parents(path, top)
            if fault is None:
                raise
            raise IrepError("{}: cannot write: {}".format(path, fault)) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


LOCK_FILE = ".lock"
# (st_dev, st_ino) of a run directory this process locks -> (thread, depth): a run started inside
# another of this thread's runs on the same directory (train --baseline) shares its lock
_held: Dict[Tuple[int, int], Tuple[int, int]] = {}


@contextlib.contextmanager
def run_directory(path: PathLike, keep: Callable[[Path], bool], command: Optional[str] = None,
                  new: bool = True) -> Iterator[Path]:
    """The run directory ``path`` for the block: created with missing parents when ``new``; if the
    block fails and ``keep(path)`` is false (nothing resumable was written), what this call created
    is removed again: no empty run directories.

    With ``command`` ("train", "search", "demo") the directory is locked for the block (one writer;
    a second gets one line naming the holder), a ``new`` run's directory must hold nothing yet (it
    overwrites nothing it did not write) and a resumed one no link or special file (a run writes
    through no link). A resume (``new`` false) of a missing directory yields it unlocked: the
    state reader says what is missing. A path that is a file or cannot be created is one IrepError.
    """
    path = Path(path)
    if not new and not path.is_dir():
        yield path
        return
    if path.exists() and not path.is_dir():
        raise IrepError("{}: is {}, not a run directory".format(path, file_kind(os.stat(str(path)).st_mode)))
    top = _make_directories(path, path, "cannot create the run directory") if new else None
    if not os.access(str(path), os.W_OK):
        raise IrepError("{}: cannot write: the run directory is not writable{}".format(path, _read_only_fs(path)))
    lock = run_lock(path, command) if command else contextlib.nullcontext()
    with lock:
        if command:  # outside the cleanup: files found here are not this call's to remove
            _check_run_entries(path, new)
        try:
            yield path
        except BaseException:
            if top is not None and not keep(path):
                shutil.rmtree(str(top), ignore_errors=True)
            raise


def _make_directories(path: Path, name: Path, action: str) -> Optional[Path]:
    """Create ``path`` and its missing parents; the highest one this call created (None: none), so
    that a directory another process created meanwhile is never counted as ours. An error names
    ``name`` (the run directory, or the file whose directory it is) and ``action``."""
    missing = []
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    top: Optional[Path] = None
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise IrepError("{}: is a file, not a directory".format(directory))
            continue
        except OSError as exc:
            if top is not None:
                shutil.rmtree(str(top), ignore_errors=True)
            raise IrepError("{}: {}: {}".format(name, action, os_cause(exc))) from exc
        if top is None:
            top = directory
    return top


def _check_run_entries(path: Path, new: bool) -> None:
    names = sorted(n for n in os.listdir(str(path)) if n != LOCK_FILE)
    if new and names:
        raise IrepError("{}: not empty (holds {}); a new run writes only into a new or empty directory, so that it "
                        "overwrites nothing it did not write".format(path, quote(names[0])))
    for name in names:
        mode = os.lstat(str(path / name)).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise IrepError("{}: is {}; a run directory holds only the files its run wrote, and a run writes "
                            "through no link".format(path / name, file_kind(mode)))


@contextlib.contextmanager
def run_lock(path: PathLike, command: str) -> Iterator[None]:
    """Hold the advisory lock of run directory ``path`` for the block; a second writer (another
    process, or another thread of this one) is refused with one line naming the holder."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    st = os.stat(str(path))
    key = (st.st_dev, st.st_ino)
    me = threading.get_ident()
    owner, depth = _held.get(key, (None, 0))
    if owner == me:
        _held[key] = (me, depth + 1)
        try:
            yield
        finally:
            _held[key] = (me, depth)
        return
    fd = _acquire(path, command)
    _held[key] = (me, 1)
    try:
        yield
    finally:
        del _held[key]
        lock_file = path / LOCK_FILE
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.lstat(str(lock_file))):
                os.unlink(str(lock_file))  # still holding it: whoever opens the old file retries
        os.close(fd)


def _acquire(path: Path, command: str) -> int:
    lock_file = path / LOCK_FILE
    for _ in range(20):
        try:
            fd = os.open(str(lock_file), os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, 0o644)
        except OSError as exc:
            if os.path.islink(str(lock_file)):
                raise IrepError("{}: is a symbolic link; a run directory's lock file must be its own".format(
                    lock_file)) from exc
            raise IrepError("{}: cannot lock the run directory: {}".format(path, exc.strerror or exc)) from exc
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise IrepError("{}: is {}, not a lock file".format(lock_file, file_kind(mode)))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise IrepError("{}: cannot lock the run directory: {}".format(
                        path, exc.strerror or exc)) from exc
                raise IrepError("{}: in use by {}; wait for it to end or choose another directory".format(
                    path, _holder(fd))) from exc
            try:  # a holder that just ended removed the file it locked: lock the one the path names now
                current = os.path.samestat(os.fstat(fd), os.lstat(str(lock_file)))
            except OSError:
                current = False
            if current:
                _write_holder(fd, command)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise IrepError("{}: cannot lock the run directory: its lock file keeps changing".format(path))


def _write_holder(fd: int, command: str) -> None:
    """Who holds the lock, for the message of a second writer (the lock itself is the flock)."""
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "irep-deploy " + command,
                       "started": time.time()}) + "\n"
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8"), 0)


def _holder(fd: int) -> str:
    """The holder a lock file names, as text safe for a terminal; the file may be anyone's."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        pid, host, command, started = info["pid"], info["host"], info["command"], float(info["started"])
        if not isinstance(pid, int) or not isinstance(host, str) or not isinstance(command, str):
            raise ValueError(info)
        when = time.localtime(started)
        since = time.strftime("%H:%M:%S" if when[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S", when)
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return "another irep-deploy process"  # the holder has not written its name yet
    return "{} (pid {} on {}, since {})".format(_printable(command, 40), pid, _printable(host, 60), since)


def _printable(text: str, limit: int) -> str:
    return clip("".join(c if c.isprintable() else "?" for c in text), limit)


def write_json(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _run_file(path: Path, mode: int) -> None:
    """Refuse a run file that is a link or not a regular file (``mode`` from lstat)."""
    if not stat.S_ISREG(mode):
        raise IrepError("{}: is {}; a run writes only its own regular files, through no link".format(
            path, file_kind(mode)))


def append_jsonl(path: PathLike, record: Dict[str, Any]) -> None:
    """Append one JSON record as a line (run logs), in one write: concurrent appends never interleave.
    A log that is a link (symbolic, or a second hard link) or not a regular file is refused: the
    append would change a file outside the run. A write that fails (full disk) is undone, so the
    file never ends in a cut line, and is one IrepError naming the file."""
    path = Path(path)
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC
    try:
        fd = os.open(str(path), flags, 0o666)
    except OSError as exc:
        with contextlib.suppress(OSError):
            _run_file(path, os.lstat(str(path)).st_mode)
        raise os_error(exc, path) from exc
    try:
        st = os.fstat(fd)
        _run_file(path, st.st_mode)
        if st.st_nlink > 1:
            raise IrepError("{}: has another hard link; appending would change that file too".format(path))
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, st.st_size)
            raise os_error(exc, path) from exc
    finally:
        os.close(fd)


def trim_jsonl(path: PathLike, keep: Callable[[Dict[str, Any]], bool]) -> None:
    """Keep only the records ``keep`` accepts, dropping lines a kill cut short (resumed runs). A log
    that is not a file of UTF-8 text (a directory, binary bytes: not what the run wrote) is refused
    in one line naming it, before anything is written."""
    path = Path(path)
    try:
        mode = os.lstat(str(path)).st_mode
    except FileNotFoundError:
        return
    _run_file(path, mode)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IrepError("{}: not a log of this run (not UTF-8 text at byte {}); move it away to resume".format(
            path, exc.start)) from exc
    except OSError as exc:  # a directory, an unreadable file
        raise IrepError("{}: cannot read the run's log ({}); move it away to resume".format(
            path, exc.strerror or first_line(exc))) from exc
    lines = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and keep(record):
            lines.append(line)
    with atomic_write(path, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))


class _GuardedStdout:
    """``sys.stdout`` during a command: a write or flush that fails is a :class:`StdoutError`, which
    the CLI tells apart from a failing file (a closed pipe exits quietly)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise _stdout_error(exc) from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise _stdout_error(exc) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stdout_error(exc: OSError) -> StdoutError:
    return StdoutError("stdout: {}".format(os_cause(exc)), broken_pipe=exc.errno == errno.EPIPE)


@contextlib.contextmanager
def guarded_stdout() -> Iterator[None]:
    """While the block runs, an error writing ``sys.stdout`` raises :class:`StdoutError`."""
    stream = sys.stdout
    if stream is None:
        yield
        return
    sys.stdout = _GuardedStdout(stream)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = stream


def silence_stdout() -> None:
    """Point standard output at /dev/null: what is still buffered for a closed pipe or a full device
    then goes nowhere, instead of failing again at exit ("Exception ignored ... BrokenPipeError")."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


@contextlib.contextmanager
def no_typed_storage_warning() -> Iterator[None]:
    """Hide the one warning torch 2.0's ``torch.load(weights_only=True)`` raises about its own
    internals ("TypedStorage is deprecated"); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        yield
