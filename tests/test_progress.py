"""Progress output of real training subprocesses, seen on a pseudo-terminal and through a pipe.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_progress.py -q

On a terminal: a tqdm bar with img/s and ETA. Through a pipe: a plain line every
trainer.progress_every_s seconds, no bar. In a multirun (basic and joblib launchers): "run k/N"
first lines and one summary table at the end, also when a run stops the sweep.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from ablation.progress import sweep_size
from conftest import ROOT, train

# Cheap end-of-run measures and 8 steps per epoch, so that every epoch has several progress updates.
FAST = ("trainer.batch_size=32", "eval.classifier_epochs=1", "eval.iw_samples=2", "eval.iw_images=16",
        "eval.sample_images=16")
LINE = re.compile(r"^none_seed0 epoch (\d)/2: (\d+)/256 img \(\d+%\), \d+ img/s, ETA \d+:\d\d:\d\d$", re.M)
BAR = re.compile(r"none_seed0 epoch 1/2 +\d+%\|.*\| *\d+/256 img \[\d\d:\d\d, ETA \d\d:\d\d, [\d.?]+ ?img/s\]")


@pytest.fixture(scope="module")
def study(tmp_path_factory, image_folder):
    """A results root shared by this module's runs (so later sweeps find earlier runs completed), with its env."""
    tmp = tmp_path_factory.mktemp("progress")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(ABLATION_DATA=str(image_folder), ABLATION_RESULTS=str(tmp / "results"),
               ABLATION_CACHE=str(tmp / "cache"), WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return tmp / "results", env


@pytest.fixture(scope="module")
def piped_run(study):
    """One run through a pipe with a progress line every millisecond."""
    results, env = study
    proc = train(*FAST, "trainer.progress_every_s=0.001", env=env)
    return results / "main" / "none_seed0", proc


@pytest.fixture(scope="module")
def sweep(study, piped_run):
    """A basic-launcher multirun through a pipe whose first run is piped_run's (so it is skipped)."""
    results, env = study
    return train("-m", "regularizer=none,only_beta", *FAST, "trainer.progress_every_s=0", env=env)


def run_on_pty(*args: str, env: dict, timeout: float = 300) -> str:
    """`python -m ablation.train args` with stdout and stderr on a 120-column pseudo-terminal; what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "ablation.train", "budget=smoke", "logger=none", *args],
                            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                raise AssertionError("the run on the terminal showed nothing for %.0f s" % timeout)
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every copy of the terminal's other end is closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=timeout)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, out[-4000:]
    return out


def test_a_terminal_shows_a_bar_with_images_per_second_and_eta(study):
    results, env = study
    out = run_on_pty(*FAST, "study=tty", "trainer.progress_every_s=0.001", env=env)
    assert BAR.search(out), out[-4000:]
    assert "\r" in out  # the bar redraws its line
    assert not LINE.search(out.replace("\r", "\n"))  # no plain lines beside the bar
    run = results / "tty" / "none_seed0"
    log = (run / "train.log").read_text()
    assert "%|" not in log and "ETA" not in log and "\r" not in log  # the bar stays out of the log file
    assert "ETA" not in (run / "history.csv").read_text()


def test_a_pipe_gets_plain_lines_at_the_interval_and_no_bar(piped_run):
    run, proc = piped_run
    lines = LINE.findall(proc.stderr)
    assert {epoch for epoch, _ in lines} == {"1", "2"}, proc.stderr[-4000:]
    assert len(lines) >= 4  # more than one line per epoch at a 1 ms interval, each counting further
    for epoch in ("1", "2"):
        counts = [int(n) for e, n in lines if e == epoch]
        assert counts == sorted(counts) and counts[-1] <= 256
    assert "\r" not in proc.stderr and "%|" not in proc.stderr
    assert "ETA" not in (run / "train.log").read_text()
    assert "ETA" not in (run / "history.csv").read_text()


def test_progress_every_s_zero_turns_the_lines_off(sweep):
    assert not LINE.search(sweep.stderr)
    assert "%|" not in sweep.stderr


def test_each_run_of_a_multirun_starts_with_run_k_of_n(sweep):
    first = re.search(r"run 1/2: none_seed0 .*", sweep.stdout)
    second = re.search(r"run 2/2: beta_seed0 .*sweep: 1 of 2 runs done", sweep.stdout)
    assert first and second, sweep.stdout[-4000:]
    # each is its run's first line: nothing of the run is logged before it
    assert sweep.stdout.index("run 1/2: none_seed0") < sweep.stdout.index("none_seed0: skipped")
    assert sweep.stdout.index("run 2/2: beta_seed0") < sweep.stdout.index("beta_seed0 on cpu")


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The summary table's rows by run number, split into columns."""
    lines = stdout[stdout.index("sweep of "):].splitlines()
    assert lines[1].split() == ["#", "run", "status", "test", "recon", "kl", "time"]
    return {line.split()[0]: re.split(r"\s{2,}", line.strip()) for line in lines[2:] if re.match(r"\s*\d+ ", line)}


def test_the_sweep_ends_with_a_table_of_every_run_and_its_status(sweep, study):
    results, _ = study
    assert "sweep of 2 runs" in sweep.stdout, sweep.stdout[-4000:]
    rows = table_rows(sweep.stdout)
    assert rows["1"][:3] == ["1", "none_seed0", "skipped (completed)"]
    assert rows["2"][:3] == ["2", "beta_seed0", "completed"]
    for row in rows.values():
        assert re.fullmatch(r"\d+\.\d\d", row[3]) and re.fullmatch(r"\d+\.\d\d", row[4])
        assert re.fullmatch(r"\d+:\d\d:\d\d", row[5])
    assert sweep.stdout.count("sweep of ") == 1
    assert not list((results / "main").glob(".sweep-*"))  # the bookkeeping folder is gone


def test_a_run_that_stops_the_sweep_still_gets_the_table(sweep, study):
    results, env = study
    # the second job's config differs from the completed run in its directory: it exits with that error
    proc = train("-m", "regularizer=none", "model.latent_dim=128,64", *FAST, env=env, check=False)
    assert proc.returncode == 2 and "holds a run with a different config" in proc.stderr
    rows = table_rows(proc.stdout)
    assert rows["1"][2] == "skipped (completed)"
    assert rows["2"][2] == "did not finish"
    assert proc.stdout.count("sweep of 2 runs") == 1
    assert not list((results / "main").glob(".sweep-*"))


def test_joblib_jobs_report_run_k_of_n_and_the_table(sweep, study):
    _, env = study
    proc = train("-m", "regularizer=none,only_beta", *FAST, "trainer.progress_every_s=0", "hydra/launcher=joblib",
                 "hydra.launcher.n_jobs=2", env=env)
    assert re.search(r"run 1/2: none_seed0", proc.stdout + proc.stderr)
    assert re.search(r"run 2/2: beta_seed0", proc.stdout + proc.stderr)
    rows = table_rows(proc.stdout)
    assert [rows[k][2] for k in ("1", "2")] == ["skipped (completed)", "skipped (completed)"]


@pytest.mark.parametrize("overrides,runs", [
    (("regularizer=none,all", "seed=0,1,2"), 6),
    (("+sweep=factorial", "seed=0,1"), 64),
    (("+sweep=dose_beta", "beta.value=1,2"), 2),  # the command line's values replace the sweep file's
    (("regularizer=glob(*)",), None),  # glob needs the config loader: shown as "?"
])
def test_the_run_count_is_the_basic_sweepers(compose_cfg, overrides, runs):
    """From the config a multirun composes, as the callback gets it."""
    loader = GlobalHydra.instance().config_loader()
    assert sweep_size(loader.load_configuration("config", list(overrides), run_mode=RunMode.MULTIRUN)) == runs
