"""Run-directory I/O: atomic writes and the lock that keeps two jobs out of one directory.

Every file a run writes goes through `atomic_write`: a temp file in the same directory,
flushed and fsynced, then renamed over the target. A kill at any moment leaves either the
old file or the new one, never a truncated one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, IO, Iterator

import torch


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` to a temp file, fsync it, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from a shared group
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk or a read-only folder: name the file
            raise OSError(exc.errno, f"{exc.strerror or exc}: could not write {path} "
                                     f"(check free space and permissions there)") from exc
        raise
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `run_dir/run.lock` for the duration of a run.

    The lock file is created with O_EXCL and names the holder's host and pid. A lock held by
    a live process on this host is refused with RunLockedError; a stale lock (its process is
    gone) is taken over. A lock from another host is trusted, since its process can't be checked.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "run.lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock.read_text().strip() if lock.exists() else ""
            host, _, pid = holder.partition(" ")
            stale = host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))
            if holder and not stale:
                raise RunLockedError(
                    f"run directory {run_dir} is locked by process {pid or '?'} on {host or '?'} "
                    f"(file {lock}). Two jobs must not write one run: wait for it to finish, or if that "
                    f"process is gone, delete the lock file.")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is dead
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    else:
        raise RunLockedError(f"could not take the lock {lock}; another process keeps recreating it")
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text().strip() == me:
                lock.unlink()
