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

Whether a directory holds the config being run is decided by today's config_hash of its stored
config.yaml, so that runs hashed by an earlier hash function are still recognized. A resumed run's
wall_time_s counts every attempt, and metrics.json's `attempts` says how many there were.
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig

from .config import ConfigError, config_hash as hash_config, hashed_config, stored_config
from .runio import atomic_write_json, mkdirs, read_json

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
    mkdirs(run_dir)
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


def is_locked(run_dir: str | os.PathLike) -> bool:
    """Whether a live process holds `run_dir`'s lock (a shared flock cannot be had while it does)."""
    try:
        fd = os.open(Path(run_dir) / "run.lock", os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared flock if it was had


def detach_logs(run_dir: str | os.PathLike) -> None:
    """Stop this process's log files inside `run_dir` (Hydra's train.log): another process owns that run."""
    inside = Path(run_dir).resolve()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(inside):
            root.removeHandler(handler)
            handler.close()


class RunDir:
    """One run's directory. `record` is the only writer of metrics.json: every write keeps the
    identity fields given to `start` and adds the status and metrics of the moment."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.identity: dict = {}
        self._started = time.perf_counter()
        self._earlier_s = 0.0  # wall time of the earlier attempts this one resumes

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        """The run's name in logs, metrics.json and W&B: its directory's, which is run_name plus the suffix a
        dose or lr sweep adds (beta_seed0_beta4.0), as collect and the progress table name it."""
        return self.path.name

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

    def _stored_config(self) -> DictConfig | None:
        return stored_config(self.path / "config.yaml")

    def _differences(self, cfg: DictConfig | None) -> str:
        """' in trainer.epochs (1 there, 2 here), ...' for the fields where the stored config.yaml and `cfg`
        differ; '' when either is unknown."""
        stored = self._stored_config()
        if cfg is None or stored is None:
            return ""
        there, here = (_flat(hashed_config(c)) for c in (stored, cfg))
        fields = [k for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k)]
        return "".join(f"{', ' if i else ' in '}{k} ({there.get(k)!r} there, {here.get(k)!r} here)"
                       for i, k in enumerate(fields[:8])) + (", ..." if len(fields) > 8 else "")

    def holds(self, config_hash: str) -> bool | None:
        """Whether the directory holds a run of the config hashed `config_hash`: today's hash of its stored
        config.yaml, or the hash it recorded; None when it holds no run."""
        old = self._recorded_hash()
        if old is None:
            return None
        stored = self._stored_config()
        return old == config_hash or (stored is not None and hash_config(stored) == config_hash)

    def state(self, config_hash: str, overwrite: bool = False, cfg: DictConfig | None = None) -> State:
        """The state of the run for this config (`cfg`, hashed `config_hash`); refuses a directory that
        holds another config, naming the fields that differ, or with overwrite=true clears it first."""
        same = self.holds(config_hash)
        if same is False:
            old = self._recorded_hash()
            if not overwrite:
                raise ConfigError(
                    f"run directory {self.path} holds a run with a different config{self._differences(cfg)} "
                    f"(hash {old}, this config {config_hash}). Use another study=NAME, or pass overwrite=true to "
                    f"replace it.")
            log.warning("overwrite=true: replacing the run in %s (config hash %s -> %s)", self.path, old, config_hash)
            self.clear()
            return State.ABSENT
        status = (self.metrics() or {}).get("status")
        if status in ("completed", "diverged") and same:
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

    def start(self, identity: dict, resume: bool = False) -> dict:
        """Record the run as running, with the fields every later record keeps. A resumed run adds the
        wall time of the attempts before (a killed one's up to its last written file) to its own."""
        before = (self.metrics() or {}) if resume else {}
        self._earlier_s = float(before.get("wall_time_s") or 0.0)
        if before.get("status") == "running":  # killed: from its start (when it wrote this record) to its last
            started = (self / "metrics.json").stat().st_mtime  # epoch's files
            last = max((p.stat().st_mtime for p in (self / "history.csv", self.checkpoint) if p.exists()),
                       default=started)
            self._earlier_s = float(before.get("earlier_wall_time_s") or 0.0) + max(0.0, last - started)
        self._started = time.perf_counter()
        self.identity = dict(identity) | {"attempts": int(before.get("attempts") or 1) + 1 if resume else 1}
        if resume:
            self.identity["earlier_wall_time_s"] = self._earlier_s
        return self.record("running")

    def wall_time(self) -> float:
        """Seconds this run has taken so far, over every attempt since it started from scratch."""
        return self._earlier_s + time.perf_counter() - self._started

    def record(self, status: str, **fields) -> dict:
        """Write metrics.json atomically: the identity, the status and `fields`; return what was written."""
        metrics = {**self.identity, **fields, "status": status}
        atomic_write_json(self.path / "metrics.json", metrics)
        return metrics


def _flat(tree, prefix: str = "") -> dict:
    """{"trainer.epochs": 2, ...} from a nested config container."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
