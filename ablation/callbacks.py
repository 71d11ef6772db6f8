"""Hydra callbacks of `python -m ablation.train` (registered in conf/config.yaml under hydra.callbacks).

    python -m ablation.train results_dir=/read-only/dir   # one line naming the folder and the fix, exit 2
    python -m ablation.train -m seed=0,1,2                 # a run another live sweep holds is skipped

`RunChecks` checks that the run's (or the sweep's) folder can be made and written before Hydra makes
it and writes its config files there, so that a read-only, full or missing results folder is one line
rather than Hydra's tracebacks.
A sweep's job that finds its run locked by another live process skips it (ablation/train.py);
`RunChecks` keeps the job's log lines out of that run's train.log from the job's start (list it
before other callbacks that log). The sweep's table (ablation/progress.py) lists those runs at its end.
"""
from __future__ import annotations

import os
import sys
import tempfile

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .rundir import detach_logs, is_locked
from .runio import describe_os_error, mkdirs

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


class RunChecks(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check_writable(OmegaConf.select(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_writable(OmegaConf.select(config, "hydra.sweep.dir"))

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = OmegaConf.select(config, "hydra.runtime.output_dir")
        if run_dir and is_locked(run_dir):  # the job will skip it: no line of it in the holder's train.log
            detach_logs(run_dir)
