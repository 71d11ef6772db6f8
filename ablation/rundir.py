"""A run's directory: its lock, its state, its outputs, and the one writer of its metrics.json.

    results/<study>/<run_name>/
        run.lock        held while a process trains the run (names host and pid)
        config.yaml     the resolved config
        metrics.json    status and metrics; written only through `RunDir.record`
        history.csv     epoch and step rows
        checkpoint.pt   after each epoch until the run ends; a rerun resumes from it
        model.pt, samples.png, recon_epoch*.png, recon_final.png, wandb/

A run's state, read under its lock, is one of `State`: absent (nothing yet), interrupted (a
process died or was stopped; it resumes from checkpoint.pt if there is one), completed,
diverged (both final: a rerun skips them), or failed (an exception; a rerun starts again).
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

import torch

from .config import ConfigError
from .runio import atomic_write_json, read_json

log = logging.getLogger(__name__)

# Files a run writes; `overwrite=true` removes them (and recon_epoch*.png, wandb/) before starting again.
OUTPUTS = ("metrics.json", "history.csv", "checkpoint.pt", "model.pt", "config.yaml", "samples.png",
           "recon_final.png")


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class State(enum.Enum):
    ABSENT = "absent"
    INTERRUPTED = "interrupted"
    COMPLETED = "completed"
    DIVERGED = "diverged"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        """A result that a rerun keeps: a diverged run would diverge again (on the CPU, exactly)."""
        return self in (State.COMPLETED, State.DIVERGED)


# The fds of the locks this process holds. A child forked without exec closes its copies, so that
# it cannot keep a lock alive after its parent is killed (closing a copy does not release the
# parent's flock). Python opens files close-on-exec, so exec'd children never inherit them.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `run_dir/run.lock`, an flock that the kernel drops when its process ends, however it ends.

    While held, the file names the holder ("host pid") for messages; on release it is unlinked
    while still flocked, so a process that flocks the old file afterwards sees that the name
    leads elsewhere and tries again. A live holder is refused with RunLockedError. A lock left by
    a killed process is not flocked and is taken over, unless it names another host: on a shared
    filesystem whose flock is local to each host, that host's process cannot be checked from here.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "run.lock"
    here = socket.gethostname()
    me = f"{here} {os.getpid()}"
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            host, _, pid = _holder(fd).partition(" ")
            os.close(fd)
            raise RunLockedError(f"run directory {run_dir} is locked by process {pid or '?'} on {host or '?'} "
                                 f"(file {lock}). Two jobs must not write one run: wait for it to finish.") from None
        host, _, pid = _holder(fd).partition(" ")
        if host and host != here:
            os.close(fd)
            raise RunLockedError(
                f"run directory {run_dir} is locked by process {pid} on host {host} (file {lock}); a process on "
                f"another host cannot be checked from here. Two jobs must not write one run: wait for it to "
                f"finish, or if that job is gone (e.g. a lost cluster node), delete {lock} and rerun.")
        if _same_file(fd, lock):
            break
        os.close(fd)  # released and unlinked between our open and our flock: take the new one
    else:
        raise RunLockedError(f"could not take the lock {lock}; another process keeps recreating it")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{me}\n".encode(), 0)
    _HELD.add(fd)
    try:
        yield lock
    finally:
        try:
            if _same_file(fd, lock) and _holder(fd) == me:
                lock.unlink()
        finally:
            _HELD.discard(fd)
            os.close(fd)


class RunDir:
    """One run's directory. `record` is the only writer of metrics.json: every write keeps the
    identity fields given to `start` and adds the status and metrics of the moment."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.identity: dict = {}

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def lock(self):
        return run_lock(self.path)

    def metrics(self) -> dict | None:
        return read_json(self.path / "metrics.json")

    def _recorded_hash(self) -> str | None:
        metrics = self.metrics()
        if metrics and metrics.get("config_hash"):
            return metrics["config_hash"]
        if self.checkpoint.exists():
            try:
                return torch.load(self.checkpoint, map_location="cpu", weights_only=False).get("config_hash")
            except Exception:  # an unreadable checkpoint is the same as none
                return None
        return None

    def state(self, config_hash: str, overwrite: bool = False) -> State:
        """The state of the run for this config; refuses a directory that holds another config,
        or with overwrite=true clears it first."""
        old = self._recorded_hash()
        if old is not None and old != config_hash:
            if not overwrite:
                raise ConfigError(
                    f"run directory {self.path} holds a run with a different config (hash {old}, this config "
                    f"{config_hash}). Use another study=NAME, or pass overwrite=true to replace it.")
            log.warning("overwrite=true: replacing the run in %s (config hash %s -> %s)", self.path, old, config_hash)
            self.clear()
            return State.ABSENT
        status = (self.metrics() or {}).get("status")
        if status in ("completed", "diverged") and old == config_hash:
            return State(status)
        if self.checkpoint.exists():
            return State.INTERRUPTED
        return State.FAILED if status == "failed" else State.ABSENT

    def clear(self) -> None:
        for name in OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        for png in self.path.glob("recon_epoch*.png"):
            png.unlink()
        shutil.rmtree(self.path / "wandb", ignore_errors=True)

    def start(self, identity: dict) -> dict:
        """Record the run as running, with the fields every later record keeps."""
        self.identity = dict(identity)
        return self.record("running")

    def record(self, status: str, **fields) -> dict:
        """Write metrics.json atomically: the identity, the status and `fields`; return what was written."""
        metrics = {**self.identity, **fields, "status": status}
        atomic_write_json(self.path / "metrics.json", metrics)
        return metrics
