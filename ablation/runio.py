"""Run-directory I/O: atomic writes, the lock that keeps two jobs out of one directory, and GPU slots.

Every file a run writes goes through `atomic_write`: a temp file in the same directory,
flushed and fsynced, then renamed over the target. A kill at any moment leaves either the
old file or the new one, never a truncated one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, IO, Iterator

import torch


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


# An empty or unparseable run.lock younger than this is taken to be held; an older one can
# only be left over from a crash in the middle of writing it, and is taken over.
LOCK_GRACE_S = 60.0


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


@contextlib.contextmanager
def _synced_temp(directory: Path, name: str, write: Callable[[IO[bytes]], None], mode: int) -> Iterator[str]:
    """A temp file beside `name` in `directory`, written through `write(file)`, fsynced, with `mode`
    less the umask; removed on exit unless the caller has renamed it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:  # f owns fd and closes it on every path
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
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _synced_temp(path.parent, path.name, write, 0o666) as tmp:
            os.replace(tmp, path)
    except OSError as exc:  # a full disk or a read-only folder: name the file
        raise OSError(exc.errno, f"{exc.strerror or exc}: could not write {path} "
                                 f"(check free space and permissions there)") from exc
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


# The fds of the run locks this process holds. A child forked without exec closes its copies,
# so that it cannot keep a lock alive after its parent is killed (closing a copy does not
# release the parent's flock).
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _flock(fd: int, shared: bool = False, wait: bool = False) -> bool | None:
    """Try to take an flock on `fd`: True if taken, False if another open file holds it, None if
    the filesystem has no flock (the lock then rests on its content)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return None
        raise
    return True


def _write_holder(fd: int, content: str) -> None:
    os.write(fd, content.encode())
    os.fsync(fd)


def _create_lock(lock: Path, content: str) -> int | None:
    """Create `lock` holding `content` and flocked by the returned fd; None if it already exists.

    The content goes to a temp file, which is flocked and then hard-linked to the lock's name,
    so no other process can ever see the lock unflocked or without its holder line.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.", suffix=".tmp", dir=lock.parent)
    linked = False
    try:
        os.fchmod(fd, 0o644 & ~_UMASK)
        _flock(fd)  # a fresh temp file, which nobody else can hold
        _write_holder(fd, content)
        os.link(tmp, lock)
        linked = True
        return fd
    except FileExistsError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        linked = None  # no hard links on this filesystem
    finally:
        if not linked:
            os.close(fd)
        with contextlib.suppress(OSError):  # a temp file left behind must not lose the lock just taken
            os.unlink(tmp)
    # A filesystem without hard links: O_EXCL, then flock, then the holder line. A checker that
    # opens it in between finds it empty, takes it to be held for LOCK_GRACE_S, and lets go of
    # its flock at once, which this process then waits for.
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    try:
        if _flock(fd) is False:
            _flock(fd, wait=True)
        _write_holder(fd, content)
    except BaseException:
        with contextlib.suppress(OSError):
            lock.unlink()  # an empty lock would block the run for LOCK_GRACE_S
        os.close(fd)
        raise
    return fd


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a released lock is unlinked first)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _open_existing(lock: Path) -> tuple[int, bool] | None:
    """The existing `lock` opened read-write (NFS grants an exclusive flock only then), or
    read-only if it belongs to another user; None if it is gone. Also says if read-only."""
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(lock, flags), flags == os.O_RDONLY
        except FileNotFoundError:
            return None
        except PermissionError:
            continue
    raise RunLockedError(f"the lock file {lock} cannot be read by this user; check its permissions")


def _clear_stale(lock: Path, here: str) -> None:
    """Check the existing `lock`: raise RunLockedError naming its holder if it is held, delete it
    if it is stale. Either way, or if it went away meanwhile, the caller tries to create it again."""
    run_dir = lock.parent
    opened = _open_existing(lock)
    if opened is None:
        return
    fd, read_only = opened
    try:
        locked = _flock(fd, shared=read_only)  # a shared flock is all a read-only fd gets on NFS
        holder = _holder(fd)
        host, _, pid = holder.partition(" ")
        if locked is False:  # a live process holds it, on this host or through a shared filesystem
            if host == here and pid.isdigit() and not _alive(int(pid)):
                raise RunLockedError(f"run directory {run_dir}: another job is taking over its stale lock "
                                     f"{lock} right now. Two jobs must not write one run.")
            raise RunLockedError(
                f"run directory {run_dir} is locked by process {pid or '?'} on {host or '?'} (file {lock}). "
                f"Two jobs must not write one run: wait for it to finish.")
        if not _same_file(fd, lock):
            return  # released (unlinked) between our open and our flock
        if host == here and pid == str(os.getpid()):  # NFS locks belong to the process: never our own
            raise RunLockedError(f"run directory {run_dir} is locked by process {pid} on {host} (file {lock}), "
                                 f"this very process. Two jobs must not write one run.")
        if not (host and pid.isdigit()):
            if time.time() - os.fstat(fd).st_mtime < LOCK_GRACE_S:
                raise RunLockedError(
                    f"run directory {run_dir} is locked: its lock file {lock} has no readable holder "
                    f"(another job may be creating it right now). If no job is using this run, delete "
                    f"the lock file and rerun; a lock left so is also taken over after "
                    f"{LOCK_GRACE_S:.0f} s.")
        elif host != here:
            raise RunLockedError(
                f"run directory {run_dir} is locked by process {pid} on host {host} (file {lock}); "
                f"a process on another host cannot be checked from here. Two jobs must not write one "
                f"run: wait for it to finish, or if that job is gone (e.g. a lost cluster node), "
                f"delete {lock} and rerun.")
        elif locked is None and _alive(int(pid)):  # no flock here: the holder's pid is all there is
            raise RunLockedError(
                f"run directory {run_dir} is locked by process {pid} on {host} (file {lock}). Two jobs "
                f"must not write one run: wait for it to finish, or if that process is gone, delete "
                f"the lock file.")
        if read_only:  # another user's stale lock: a shared flock does not keep a second taker out
            raise RunLockedError(
                f"run directory {run_dir} has a stale lock {lock} (process {pid or '?'} on {host or '?'} is "
                f"gone) that belongs to another user; delete it and rerun.")
        # Stale: its holder is gone (a flock dies with its process, whatever pid the line names),
        # or it was left half-written. Unlinked while we hold its flock, so a process that flocks
        # it after us sees it gone; the caller then creates a new one, or is refused by whoever
        # created one first. Without flock, the same-file check above only narrows the window in
        # which a second taker could delete the lock a first one has just created.
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `run_dir/run.lock` for the duration of a run.

    The lock is an flock on run.lock, which the kernel drops when its process ends, however it
    ends; the file's line names the holder's host and pid for messages. It appears already
    flocked and with that line in it (a temp file, flocked, written, then hard-linked into
    place), and is unlinked on release while still flocked, so a taker checks that the name
    still leads to the file it flocked. An existing lock is:
    - flocked: held by a live process, refused with RunLockedError;
    - not flocked, naming this host: stale, its holder is gone; deleted by the one taker that
      flocks it, then created anew (a live process with the dead holder's pid does not matter);
    - from another host: refused, since its process can't be checked from here (the error
      says to delete the lock file if that job is gone);
    - empty or unparseable: refused while younger than LOCK_GRACE_S, taken over after that
      (only a crash while writing it could leave one so).
    On a filesystem without flock, a lock naming a live pid on this host is held, and a stale one
    is taken over on a best-effort basis. Hosts must have distinct hostnames.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "run.lock"
    here = socket.gethostname()
    me = f"{here} {os.getpid()}\n"
    for _ in range(5):
        fd = _create_lock(lock, me)
        if fd is not None:
            break
        _clear_stale(lock, here)
    else:
        raise RunLockedError(f"could not take the lock {lock}; another process keeps recreating it")
    _HELD.add(fd)
    try:
        yield lock
    finally:
        try:
            if _same_file(fd, lock) and _holder(fd) == me.strip():
                lock.unlink()  # before the flock is dropped: a taker that flocks it next sees it unlinked
        except FileNotFoundError:
            pass
        finally:
            _HELD.discard(fd)
            os.close(fd)


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
