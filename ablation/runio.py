"""File I/O shared by runs and reports: atomic writes, tolerant JSON reading, and GPU slots.

Every file a run writes goes through `atomic_write`: a temp file in the same directory,
flushed and fsynced, then renamed over the target. A kill at any moment leaves either the
old file or the new one, never a truncated one; the temp file it leaves behind is flocked while
written, so `remove_stale_temps` can tell it from one a live writer holds.

An OSError of a write (full disk, read-only folder, no permission) names its file; `describe_os_error`
turns it into the one line a user sees, with the fix.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Iterator

import torch


# The umask, read once at import: os.umask can only be read by setting it, and doing that on
# every write would briefly leave it at the dummy value while other threads create files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TEMP_SUFFIX = ".tmp"
# errno values that mean "no room to write": a full disk, a quota, a file size limit.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# errno values that mean "not allowed to write here".
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that caused `exc`: itself, or one in its context (torch.save reports a failed write
    as RuntimeError "enforce fail at inline_container.cc", raised while handling the OSError)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(exc: OSError) -> str:
    """One line naming the path, the cause and the fix of an I/O failure."""
    path = exc.filename or "a file"
    cause = exc.strerror or OSError.__str__(exc)
    if exc.errno in _NO_SPACE:
        fix = "free space there (or raise the quota or file size limit), or write elsewhere (results_dir=DIR)"
    elif exc.errno in _NOT_ALLOWED:
        fix = "make it writable for this user, or write elsewhere (results_dir=DIR)"
    elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
        fix = "check that every folder on that path exists and is a folder, or write elsewhere (results_dir=DIR)"
    else:
        fix = "check the file system there, or write elsewhere (results_dir=DIR)"
    return f"{cause}: could not write {path}; {fix}"


class WriteError(OSError):
    """An OSError of a write, whose message is `describe_os_error`'s line."""

    def __str__(self) -> str:
        return describe_os_error(self)


def mkdirs(path: str | os.PathLike) -> None:
    """`path` and its parents, or a WriteError naming the first folder that could not be made."""
    path = Path(path)
    if path.is_dir():
        return
    for parent in reversed((path, *path.parents)):
        if parent.exists() and not parent.is_dir():
            raise WriteError(errno.ENOTDIR, "Not a directory", str(parent))
        if not parent.is_dir():
            try:
                parent.mkdir(exist_ok=True)
            except OSError as exc:
                raise WriteError(exc.errno, exc.strerror, str(parent)) from None


def check_free_space(path: str | os.PathLike, need_bytes: int) -> None:
    """Raise WriteError(ENOSPC) naming `path` when its file system has less than `need_bytes` free."""
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise WriteError(errno.ENOSPC, f"No space left on device: {free / 2**20:.0f} MiB free, a run needs about "
                                    f"{need_bytes / 2**20:.0f} MiB", str(path))


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed writes left in `directory`; return them.

    A writer flocks its temp file until it is renamed or removed, and a killed writer's flock is gone
    with it: a temp file whose flock can be taken has no live writer, and a held one is kept.
    """
    removed = []
    for tmp in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:  # gone meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # a live writer holds it (BlockingIOError), or it is already gone
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _synced_temp(directory: Path, name: str, write: Callable[[IO[bytes]], None], mode: int) -> Iterator[str]:
    """A temp file beside `name` in `directory`, written through `write(file)`, fsynced, with `mode`
    less the umask; removed on exit unless the caller has renamed it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:  # f owns fd and closes it on every path
            fcntl.flock(f, fcntl.LOCK_EX)  # held until closed: remove_stale_temps keeps a live writer's file
            os.fchmod(f.fileno(), mode & ~_UMASK)  # not mkstemp's 0600, which would hide it from a shared group
            write(f)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` to a temp file, fsync it, and rename it into place."""
    path = Path(path)
    mkdirs(path.parent)
    try:
        with _synced_temp(path.parent, path.name, write, 0o666) as tmp:
            os.replace(tmp, path)
    except Exception as exc:  # a full disk or a read-only folder: name the file
        cause = _os_error_in(exc)
        if cause is None:
            raise
        raise WriteError(cause.errno, cause.strerror or str(cause), str(path)) from exc
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, data: dict) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None if the file is absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def device_slot(count: int, first: int, lock_dir: str | os.PathLike | None = None) -> Iterator[int | None]:
    """Hold one of `count` device slots (GPUs) of this machine while a run uses it.

    The slot is the first free one from `first` on, in order; each is an flock on a file in the
    temp directory, which the kernel releases when the process ends, however it ends. Yields None
    when every slot is held (more parallel jobs than devices): the caller then shares `first`.
    """
    where = Path(lock_dir or tempfile.gettempdir())
    for i in range(count):
        k = (first + i) % count
        f = open(where / f"ablation-{os.getuid()}-device{k}.lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        try:
            yield k
        finally:
            f.close()  # closing the file drops its flock
        return
    yield None
