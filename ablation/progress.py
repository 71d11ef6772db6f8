"""Progress output: within each epoch, across the runs of a multirun, and a summary when it ends.

    python -m ablation.train budget=smoke logger=none                        # a bar on a terminal
    python -m ablation.train budget=smoke logger=none 2>&1 | cat             # a plain line every 30 s
    python -m ablation.train trainer.progress_every_s=5 2> progress.txt      # a plain line every 5 s
    python -m ablation.train trainer.progress_every_s=0                      # neither
    python -m ablation.train -m regularizer=none,all budget=smoke logger=none  # run 1/2, run 2/2, a table

Within an epoch (`EpochProgress`, driven by the trainer): on a terminal a tqdm bar with images/s
and the epoch's ETA; otherwise (a log file, a pipe, SLURM) one plain line every
`trainer.progress_every_s` seconds. Both go to stderr only: not into history.csv or train.log.

Across a multirun (`SweepProgress`, a Hydra callback registered in conf/config.yaml): each run's
first log line says "run k/N" and the sweep's ETA, and when the sweep ends one table lists every
run with its status, test recon, KL and time. The jobs may run in other processes (joblib,
submitit), so they share what they know through files in a bookkeeping folder of this multirun,
`<sweep dir>/.sweep-<time>-<pid>/`: sweep.json (N, parallel jobs, start) and one job<k>.json
per job (its run directory, start, end, status). The table is printed from those files, and the
folder is removed after it.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from tqdm import tqdm

from .rundir import State
from .runio import atomic_write_json, read_json

log = logging.getLogger(__name__)

BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} img [{elapsed}, ETA {remaining}, {rate_fmt}]"


def duration(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class EpochProgress:
    """Progress of one epoch's training steps, on `stream` (stderr): a bar on a terminal, else a line
    every `every_s` seconds; nothing when `every_s` is 0. `update` takes no device sync: it counts
    the images of the steps issued."""

    def __init__(self, label: str, epoch: int, epochs: int, images: int, every_s: float,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.desc = f"{label} epoch {epoch}/{epochs}"
        self.images = images
        self.every_s = every_s
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if every_s > 0 and self.stream.isatty():
            # redraws at most every 0.1 s (tqdm's default), or every every_s when that is shorter
            self.bar = tqdm(total=images, desc=self.desc, unit="img", file=self.stream, leave=False,
                            dynamic_ncols=True, bar_format=BAR_FORMAT, mininterval=min(0.1, every_s))

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.every_s > 0:
            now = time.monotonic()
            if now - self.last >= self.every_s:
                self.last = now
                self._line(now - self.start)

    def _line(self, elapsed: float) -> None:
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.images - self.done) / rate if rate > 0 else 0.0
        print(f"{self.desc}: {self.done}/{self.images} img ({100 * self.done / self.images:.0f}%), "
              f"{rate:.0f} img/s, ETA {duration(eta)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------ the sweep


def sweep_size(config: DictConfig) -> int | None:
    """The number of jobs the basic sweeper makes of the sweeper's params and the command line's
    overrides (the last value of a key wins, as in the sweeper); None for another sweeper or for
    overrides that need the config loader to expand (glob)."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    sizes: dict[str, int] = {}
    try:
        for o in OverridesParser.create().parse_overrides(arguments):
            sizes[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    except HydraException:
        return None
    return math.prod(sizes.values())


def parallel_jobs(config: DictConfig) -> int:
    """How many jobs the launcher runs at once: joblib's n_jobs (-1 = one per core), submitit's
    array_parallelism, else 1."""
    launcher = config.hydra.get("launcher") or {}
    n = int(launcher.get("n_jobs") or launcher.get("array_parallelism") or 1)
    return max(1, n if n > 0 else (os.cpu_count() or 1) + 1 + n)


def _stamp(path: Path) -> list[int] | None:
    """The identity of a file's current version: an atomic write replaces the inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_mtime_ns]


def sweep_eta(info: dict, jobs: list[dict]) -> str:
    """The sweep's ETA from the completed runs' times, the runs left and the parallel jobs."""
    runs = info.get("runs")
    done = [j for j in jobs if "seconds" in j]
    trained = [j["seconds"] for j in done if j["status"] == "completed"]
    if runs is None:
        return f"sweep: {len(done)} runs done, size unknown"
    if not trained:
        return f"sweep: {len(done)} of {runs} runs done, ETA once a run has trained"
    left = max(0, runs - len(done))
    waves = math.ceil(left / max(1, min(info.get("parallel") or 1, left)))
    return f"sweep: {len(done)} of {runs} runs done, ETA {duration(waves * sum(trained) / len(trained))}"


def _status(job_return: JobReturn, metrics: dict, untouched: bool) -> str:
    """completed, diverged, interrupted, failed, not started, locked, or skipped (completed|diverged) when
    the run was final before the job and the job did not write its metrics.json."""
    if job_return.status is JobStatus.FAILED:
        return "failed"
    returned = job_return.return_value
    if isinstance(returned, dict) and returned.get("status") in ("not started", "locked"):  # refused for the
        return returned["status"]  # deadline, or held by another live process
    status = metrics.get("status") or "unknown"
    final = {s.value for s in State if s.final}
    return f"skipped ({status})" if untouched and status in final else status


def summary_table(info: dict, jobs: list[dict]) -> str:
    """One row per job of the sweep, in job order, with jobs that never started as 'not run'."""
    by_num = {j["num"]: j for j in jobs}
    nums = range(max([info.get("runs") or 0, *[n + 1 for n in by_num]]))
    header = ("#", "run", "status", "test recon", "kl", "time")
    rows = []
    for n in nums:
        job = by_num.get(n)
        if job is None:
            rows.append((str(n + 1), "-", "not run", "-", "-", "-"))
            continue
        # a job that did not report its end may have left another config's metrics behind
        metrics = read_json(Path(job["dir"]) / "metrics.json") or {} if "status" in job else {}
        status = job.get("status", "did not finish")
        rows.append((str(n + 1), job["run"], status, _number(metrics.get("test_recon")),
                     _number(metrics.get("test_kl")),
                     duration(job["seconds"]) if "seconds" in job else "-"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = (0, 3, 4, 5)  # right-aligned columns
    lines = ["  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[2]] = counts.get(r[2], 0) + 1
    total = ", ".join(f"{v} {k}" for k, v in counts.items())
    title = f"sweep of {len(rows)} runs in {duration(time.time() - info['started'])}: {total}"
    return "\n".join([title, *lines])


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


class SweepProgress(Callback):
    """Hydra callback: "run k/N" and the sweep's ETA as each job's first log line, and the summary
    table when the multirun ends. Registered under hydra.callbacks in conf/config.yaml."""

    def __init__(self) -> None:
        self.folder: str | None = None  # set in the launching process before any job is sent out
        self.printed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir) / f".sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "sweep.json", {"runs": sweep_size(config), "parallel": parallel_jobs(config),
                                                  "started": time.time()})
        self.folder = str(folder)
        # Hydra skips on_multirun_end when a job raised; the table is printed at exit then.
        atexit.register(self.summary)

    def _jobs(self) -> list[dict]:
        return [j for p in sorted(Path(self.folder).glob("job*.json")) if (j := read_json(p))]

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.folder is None:  # a single run
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        num = int(config.hydra.job.num)
        info = read_json(Path(self.folder) / "sweep.json") or {}
        eta = sweep_eta(info, self._jobs())
        atomic_write_json(Path(self.folder) / f"job{num}.json",
                          {"num": num, "run": run_dir.name, "dir": str(run_dir), "started": time.time(),
                           "stamp": _stamp(run_dir / "metrics.json")})
        log.info("run %d/%s: %s  (%s)", num + 1, info.get("runs") or "?", run_dir.name, eta)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.folder is None:
            return
        path = Path(self.folder) / f"job{int(config.hydra.job.num)}.json"
        job = read_json(path)
        if job is None:
            return
        metrics_path = Path(job["dir"]) / "metrics.json"
        status = _status(job_return, read_json(metrics_path) or {}, _stamp(metrics_path) == job["stamp"])
        atomic_write_json(path, job | {"seconds": time.time() - job["started"], "status": status})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.summary()

    def summary(self) -> None:
        """Print the table once, and the runs another live process held; then remove this multirun's
        bookkeeping folder."""
        if self.printed or self.folder is None:
            return
        self.printed = True
        info, jobs = read_json(Path(self.folder) / "sweep.json"), self._jobs()
        if info is not None:
            print(summary_table(info, jobs), file=sys.stdout, flush=True)
        locked = [j["run"] for j in jobs if j.get("status") == "locked"]
        if locked:
            print(f"skipped {len(locked)} run(s) that another live process holds: {', '.join(locked)}; rerun the "
                  f"command once it has finished to train what it leaves", file=sys.stderr, flush=True)
        shutil.rmtree(self.folder, ignore_errors=True)
