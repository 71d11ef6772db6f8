"""Hydra callbacks of `python -m ablation.train` (registered in conf/config.yaml under hydra.callbacks).

    python -m ablation.train results_dir=/read-only/dir   # one line naming the folder and the fix, exit 2
    python -m ablation.train -m seed=0,1,2                 # runs another live sweep holds are listed at the end

`RunChecks` checks that the run's (or the sweep's) folder can be made and written before Hydra makes
it and writes its config files there, so that a read-only, full or missing results folder is one line
rather than Hydra's tracebacks.
A sweep's job that finds its run locked by another live process skips it (ablation/train.py) and
notes it with `note_locked`; `RunChecks` keeps the job's log lines out of that run's train.log from
the job's start (list it before other callbacks that log), and lists those runs when the sweep ends, in the sweep's process,
whichever launcher ran the jobs (they inherit the note file's name through the environment).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .rundir import detach_logs, is_locked
from .runio import describe_os_error, mkdirs

_NOTES = "ABLATION_LOCKED_RUNS"  # the environment variable naming the sweep's note file


# Bytes of the probe written before Hydra writes its .hydra/*.yaml files (a few KiB each) there.
_PROBE_BYTES = 16 * 1024


def check_writable(folder: str | os.PathLike) -> None:
    """Make `folder` and write a temp file of _PROBE_BYTES there; on failure print one line and exit 2."""
    try:
        mkdirs(folder)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(bytes(_PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(folder)
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        sys.exit(2)


def note_locked(run_dir: str | os.PathLike) -> None:
    """Note, for the end of the sweep, that another live process holds `run_dir`."""
    notes = os.environ.get(_NOTES)
    if notes:
        with open(notes, "a") as f:  # one short append per line: parallel jobs' lines do not mix
            f.write(f"{run_dir}\n")


class RunChecks(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check_writable(OmegaConf.select(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_writable(OmegaConf.select(config, "hydra.sweep.dir"))
        fd, notes = tempfile.mkstemp(prefix="ablation-locked-", suffix=".txt")
        os.close(fd)
        os.environ[_NOTES] = notes

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = OmegaConf.select(config, "hydra.runtime.output_dir")
        if run_dir and is_locked(run_dir):  # the job will skip it: no line of it in the holder's train.log
            detach_logs(run_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        notes = os.environ.pop(_NOTES, None)
        if not notes:
            return
        locked = Path(notes).read_text().splitlines() if Path(notes).is_file() else []
        Path(notes).unlink(missing_ok=True)
        if locked:  # printed: the logging of the sweep's process may still write to its last job's train.log
            print(f"skipped {len(locked)} run(s) that another live process holds: "
                  f"{', '.join(Path(p).name for p in locked)}; rerun the command once it has finished to train "
                  f"what it leaves", file=sys.stderr)
