"""File I/O shared by runs and reports: atomic writes, tolerant JSON reading, and GPU slots.

Every file a run writes goes through `atomic_write`: a temp file in the same directory,
flushed and fsynced, then renamed over the target. A kill at any moment leaves either the
old file or the new one, never a truncated one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
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
