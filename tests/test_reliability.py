"""Sweeps that survive: kill and resume, skip, config-hash refusal, divergence, failures, locks, launchers."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ablation import collect as C
from ablation.config import ConfigError, config_hash
from ablation.rundir import RunDir, RunLockedError, State, run_lock
from ablation.runio import atomic_write, atomic_write_text, check_free_space, remove_stale_temps
from conftest import ROOT, train
from wandb_records import read_run

# metrics.json fields that differ between two runs of one config: timings, attempts, the study and its W&B id
PER_RUN_KEYS = {"images_per_s", "train_time_s", "wall_time_s", "study", "wandb_id", "attempts", "earlier_wall_time_s"}
SLOW = ("trainer.epochs=4", "data.train_size=512", "model.width=16",  # ~1 s per epoch
        "trainer.checkpoint_every_s=0")  # a checkpoint after every epoch, for the kill to land after one


def metrics(d: Path) -> dict:
    return json.loads((d / "metrics.json").read_text())


def test_sigkill_mid_epoch_then_rerun_resumes_exactly(env):
    results = Path(env["ABLATION_RESULTS"])
    run_dir = results / "killed" / "wd-do-bn-beta-aug_seed0"
    args = [sys.executable, "-m", "ablation.train", "budget=smoke", "logger=none", "regularizer=all",
            "trainer.threads=1", *SLOW]
    proc = subprocess.Popen([*args, "study=killed"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists():  # epoch 1 is done: we are inside epoch 2
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert metrics(run_dir)["status"] == "running"
    # Every file left behind is whole: the checkpoint loads, the CSV and JSON parse.
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] >= 1
    assert ckpt["config_hash"] == metrics(run_dir)["config_hash"], "the checkpoint names its config"
    pd.read_csv(run_dir / "history.csv")

    resumed = subprocess.run([*args, "study=killed"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint after epoch {ckpt['epoch']}" in resumed.stdout + resumed.stderr
    straight = subprocess.run([*args, "study=straight"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = metrics(run_dir), metrics(results / "straight" / "wd-do-bn-beta-aug_seed0")
    assert a["status"] == "completed"
    assert (a["attempts"], b["attempts"]) == (2, 1), "metrics.json counts the attempts"
    assert a["wall_time_s"] > a["earlier_wall_time_s"] > 0, "the wall time counts the killed attempt too"
    for key in set(a) - PER_RUN_KEYS:
        assert a[key] == b[key], key
    ha, hb = (pd.read_csv(d / "history.csv") for d in (run_dir, results / "straight" / run_dir.name))
    cols = [c for c in ha.columns if c not in ("images_per_s", "epoch_time_s")]
    pd.testing.assert_frame_equal(ha[cols], hb[cols])


def test_config_hash_mismatch_is_refused_unless_overwrite(env):
    train("regularizer=none", "trainer.epochs=1", env=env)
    run_dir = Path(env["ABLATION_RESULTS"]) / "main" / "none_seed0"
    old = metrics(run_dir)
    proc = train("regularizer=none", "trainer.epochs=2", env=env, check=False)
    assert proc.returncode == 2
    assert "holds a run with a different config" in proc.stderr and "overwrite=true" in proc.stderr
    assert metrics(run_dir) == old, "the finished run is untouched"
    train("regularizer=none", "trainer.epochs=2", "overwrite=true", env=env)
    new = metrics(run_dir)
    assert new["status"] == "completed" and new["epochs_completed"] == 2
    assert new["config_hash"] != old["config_hash"]


def fault(env: dict, spec: str) -> dict:
    """`env` with tests/faults/sitecustomize.py loaded: ABLATION_FAULT=<kind>:<seed> (see there)."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "faults"), env.get("PYTHONPATH")) if p)
    return env | {"PYTHONPATH": path, "ABLATION_FAULT": spec}


def test_divergence_is_recorded_and_the_sweep_goes_on(env):
    env = fault(env, "nan_loss:0")
    proc = train("-m", "seed=0,1", env=env)
    study = Path(env["ABLATION_RESULTS"]) / "main"
    bad, good = metrics(study / "none_seed0"), metrics(study / "none_seed1")
    assert bad["status"] == "diverged" and bad["diverged_epoch"] == 1 and bad["diverged_step"] == 1
    assert good["status"] == "completed"
    h = pd.read_csv(study / "none_seed0" / "history.csv")
    assert h[h.kind == "diverged"][["epoch", "step"]].values.tolist() == [[1, 1]]
    assert "diverged" in proc.stdout + proc.stderr
    # a rerun keeps the diverged run as the result it is, instead of training it again
    again = train("-m", "seed=0,1", env=env)
    assert "none_seed0: skipped (diverged" in again.stdout + again.stderr
    assert "none_seed1: skipped (completed" in again.stdout + again.stderr
    assert metrics(study / "none_seed0") == bad


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_process_launchers_run_a_two_run_sweep(env, launcher):
    """Each job of a process launcher is a complete run with its own offline W&B run."""
    env = env | {"WANDB_MODE": "offline"}
    train("-m", "regularizer=none,all", f"hydra/launcher={launcher}", "trainer.epochs=1", "logger=wandb",
          env=env, timeout=600)
    study = Path(env["ABLATION_RESULTS"]) / "main"
    for run in ("none_seed0", "wd-do-bn-beta-aug_seed0"):
        m = metrics(study / run)
        assert m["status"] == "completed", m.get("error")
        wandb_runs = list((study / run / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(wandb_runs) == 1, f"{run}: one W&B run per Hydra job, found {wandb_runs}"
        assert read_run(wandb_runs[0]).exit_code == 0 and read_run(wandb_runs[0]).name == run
        if launcher == "joblib":
            assert m["threads"] == max(1, len(os.sched_getaffinity(0)) // 2), "cores / n_jobs threads per job"


def test_a_failing_job_is_recorded_and_the_joblib_sweep_completes(env):
    proc = train("-m", "hydra/launcher=joblib", "seed=0,1", "trainer.epochs=1", env=fault(env, "raise:0"),
                 check=False, timeout=600)
    assert proc.returncode == 1, "a multirun with a failed job exits 1 after all jobs ran"
    study = Path(env["ABLATION_RESULTS"]) / "main"
    failed, ok = metrics(study / "none_seed0"), metrics(study / "none_seed1")
    assert failed["status"] == "failed" and "injected fault" in failed["error"]
    assert ok["status"] == "completed"


def test_slurm_launcher_composes_with_its_settings(env):
    proc = subprocess.run([sys.executable, "-m", "ablation.train", "--cfg", "hydra",
                           "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "SlurmLauncher" in out
    for line in ("partition: gpu", "timeout_min: 240", "gpus_per_node: 1", "cpus_per_task: 8", "mem_gb: 32",
                 "array_parallelism: 32"):
        assert line in out, line


HOLD_LOCK = """
import sys, time
from ablation.rundir import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)  # until the test kills it
"""


def assert_taken_over(run_dir: Path) -> None:
    """run_lock takes run_dir's lock, which then names this process, and removes it on release."""
    with run_lock(run_dir) as lock:
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    assert not lock.exists()


def lock_holder(run_dir: Path) -> subprocess.Popen:
    """A process that holds run_dir's lock (through run_lock) until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_live_lock_is_refused_and_stale_lock_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = lock_holder(run_dir)
    try:
        with pytest.raises(RunLockedError, match=f"locked by process {holder.pid}"):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
    lock = run_dir / "run.lock"
    assert lock.read_text().split() == [socket.gethostname(), str(holder.pid)]
    assert_taken_over(run_dir)  # the holder is dead now: its lock is stale


def test_a_stale_lock_naming_a_reused_pid_is_taken_over(tmp_path):
    """A dead holder's pid now belongs to another live process: nobody holds the lock, so it is stale."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / "run.lock").write_text(f"{socket.gethostname()} {other.pid}\n")
        assert_taken_over(run_dir)
    finally:
        other.kill()
        other.wait()


RACE_TAKER = """
import errno, os, sys, time
from pathlib import Path
from ablation.rundir import RunLockedError, run_lock
run_dir, work, takers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
if sys.argv[5] == "no hard links":  # as on vfat or some SMB mounts: os.link fails with EPERM
    def link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    os.link = link
holders, ready = work / "holders", work / "ready"
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < takers:  # start together
    time.sleep(0.01)
dead = sys.argv[4]
wins = overlaps = 0
end = time.monotonic() + 2.0
while time.monotonic() < end:
    try:
        with run_lock(run_dir) as lock:
            wins += 1
            mine = holders / str(os.getpid())
            mine.touch()
            time.sleep(0.002)
            overlaps += len(list(holders.iterdir())) > 1
            mine.unlink()
            lock.write_text(dead)  # leave it as a dead holder would: stale, for the next taker
    except RunLockedError:
        pass
print(wins, overlaps, flush=True)
"""


@pytest.mark.parametrize("filesystem", ["hard links", "no hard links"])
def test_processes_racing_for_stale_locks_never_both_win(tmp_path, filesystem):
    """Four processes race for two seconds over a lock that every winner leaves stale, as a crashed
    holder would: each stale lock is taken over by one of them at a time."""
    run_dir, work = tmp_path / "run", tmp_path / "work"
    for d in (run_dir, work / "holders", work / "ready"):
        d.mkdir(parents=True)
    dead = f"{socket.gethostname()} {dead_pid()}\n"
    (run_dir / "run.lock").write_text(dead)
    takers = [subprocess.Popen([sys.executable, "-c", RACE_TAKER, str(run_dir), str(work), "4", dead, filesystem],
                               cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = []
    for taker in takers:
        out, err = taker.communicate(timeout=120)
        assert taker.returncode == 0, err
        results.append(tuple(map(int, out.split())))
    assert sum(w for w, _ in results) >= 20, f"too few takeovers to show anything: {results}"
    assert all(o == 0 for _, o in results), f"(wins, overlaps) per process: {results}"
    assert (run_dir / "run.lock").read_text() == dead


FORKING_HOLDER = """
import os, sys, time
from ablation.rundir import run_lock
with run_lock(sys.argv[1]):
    child = os.fork()  # without exec, like a fork-started worker process
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
"""


def test_a_forked_child_does_not_keep_a_killed_parents_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunLockedError, match=f"locked by process {holder.pid}"):
            with run_lock(run_dir):
                pass
        holder.kill()
        holder.wait()
        assert _pid_running(child), "the forked child outlives its parent"
        assert_taken_over(run_dir)  # the parent is dead: its lock is stale although the child lives
    finally:
        holder.kill()
        holder.wait()
        os.kill(child, signal.SIGKILL)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_processes_never_share_a_run_directory(env):
    """A second job on a locked run directory is refused with a clear message."""
    results = Path(env["ABLATION_RESULTS"])
    run_dir = results / "main" / "none_seed0"
    holder = lock_holder(run_dir)
    try:
        proc = train("regularizer=none", env=env, check=False)
        assert proc.returncode == 2 and f"is locked by process {holder.pid}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (run_dir / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_an_empty_lock_file_nobody_holds_is_taken_over(tmp_path):
    """Only the flock decides whether a lock on this host is held: an empty file left by a crash is not."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text("")
    assert_taken_over(run_dir)


def test_a_lock_from_another_host_is_refused_and_says_how_to_clear_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "run.lock"
    lock.write_text("node-elsewhere.invalid 12345\n")
    old = time.time() - 3600  # however old: its process can't be checked from here
    os.utime(lock, (old, old))
    with pytest.raises(RunLockedError) as info:
        with run_lock(run_dir):
            pass
    message = str(info.value)
    assert str(lock) in message and "delete" in message
    assert "node-elsewhere.invalid" in message and "12345" in message
    assert "cannot be checked" in message
    assert lock.read_text() == "node-elsewhere.invalid 12345\n", "the other host's lock is kept"


def test_a_taken_lock_names_this_process_and_leaves_no_temp_file(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock(run_dir) as lock:
        assert lock == run_dir / "run.lock"
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]
        # A second taker in this live process is refused, and leaves no temp file either.
        with pytest.raises(RunLockedError, match=f"locked by process {os.getpid()}"):
            with run_lock(run_dir):
                pass
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]
    assert list(run_dir.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_atomic_write_cleans_up_when_the_writer_raises(tmp_path):
    target = tmp_path / "history.csv"
    atomic_write_text(target, "old")
    fds = len(os.listdir("/proc/self/fd"))

    def broken(f):
        f.write(b"half")
        raise ValueError("writer bug")

    for _ in range(20):
        with pytest.raises(ValueError, match="writer bug"):
            atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"], "the temp file is removed"
    assert len(os.listdir("/proc/self/fd")) == fds, "the temp file's descriptor is closed"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    from ablation.runio import atomic_write
    with pytest.raises(OSError, match=f"disk full.*could not write {target}"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "the temp file is removed"


def test_a_checkpoint_alone_names_its_config(tmp_path):
    """Without a readable metrics.json, the checkpoint's config hash decides: resume or refuse."""
    torch.save({"config_hash": "aaaa", "epoch": 1}, tmp_path / "checkpoint.pt")
    assert RunDir(tmp_path).state("aaaa") is State.INTERRUPTED
    with pytest.raises(ConfigError, match="different config"):
        RunDir(tmp_path).state("bbbb")
    (tmp_path / "metrics.json").write_text("{truncated")
    with pytest.raises(ConfigError, match="different config"):
        RunDir(tmp_path).state("bbbb")


def test_parallel_runs_take_different_gpus_while_one_is_free(tmp_path):
    """Three GPUs: jobs ask for job_num % 3, but a busy GPU is skipped for the next free one."""
    import contextlib

    from ablation.runio import device_slot

    with contextlib.ExitStack() as held:
        got = [held.enter_context(device_slot(3, first, tmp_path)) for first in (1, 1, 1)]
        assert got == [1, 2, 0], "each job a GPU of its own"
        with device_slot(3, 1, tmp_path) as extra:
            assert extra is None, "all three busy: the caller shares its own"
    with device_slot(3, 1, tmp_path) as again:
        assert again == 1, "released when the runs end"
    # a slot held by another process is busy too, until that process is gone
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ablation.runio import device_slot\n"
                               f"with device_slot(3, 2, {str(tmp_path)!r}) as k:\n"
                               "    print(k, flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "2"
        with device_slot(3, 2, tmp_path) as k:
            assert k == 0
    finally:
        holder.kill()
        holder.wait()
    with device_slot(3, 2, tmp_path) as k:
        assert k == 2, "a killed holder's slot is free"


# ------------------------------------------------------------------ I/O errors, housekeeping, hashes


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit status 2 and one `error:` line holding every needle, and no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "enforce fail" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_an_unwritable_results_folder_is_one_line(env, tmp_path):
    """A folder that cannot be made (here /sys, read-only even for root) or a path through a file."""
    proc = train("results_dir=/sys/ablation-results", env=env, check=False)
    one_line_error(proc, "/sys/ablation-results", "could not write", "make it writable", "results_dir=")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = train("-m", "seed=0,1", f"results_dir={blocker}/results", env=env, check=False)
    one_line_error(proc, str(blocker), "Not a directory", "results_dir=")


def test_a_full_disk_is_refused_before_training_with_one_line(tmp_path):
    with pytest.raises(OSError) as info:
        check_free_space(tmp_path, 2**62)
    message = str(info.value)
    assert str(tmp_path) in message and "No space left" in message and "free space there" in message
    check_free_space(tmp_path, 1)  # enough room: nothing raised


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_folder) -> Path:
    """A completed smoke run none_seed0 (2 epochs), trained once for the tests below to copy."""
    tmp = tmp_path_factory.mktemp("finished")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "ABLATION_DATA": str(image_folder), "ABLATION_RESULTS": str(tmp / "results"),
        "ABLATION_CACHE": str(tmp / "cache"), "WANDB_MODE": "disabled"}
    train("regularizer=none", env=env)
    return tmp / "results" / "main" / "none_seed0"


def copy_run(finished: Path, env: dict) -> Path:
    import shutil

    run_dir = Path(env["ABLATION_RESULTS"]) / "main" / "none_seed0"
    shutil.copytree(finished, run_dir)
    return run_dir


def test_a_wrong_typed_metric_excludes_the_run_with_its_reason(finished_run, env):
    run_dir = copy_run(finished_run, env)
    record = metrics(run_dir) | {"test_recon": "abc"}
    (run_dir / "metrics.json").write_text(json.dumps(record))
    runs, _ = C.collect_study(run_dir.parent)
    row = runs.iloc[0]
    assert not row["included"] and "test_recon='abc', not a number" in row["excluded_reason"]
    assert pd.isna(row["test_recon"]), "the bad value stays out of the numeric column"


def test_a_different_config_is_refused_naming_the_fields_that_differ(finished_run, env):
    copy_run(finished_run, env)
    proc = train("regularizer=none", "trainer.epochs=1", "optim.lr=0.002", env=env, check=False)
    line = one_line_error(proc, "holds a run with a different config")
    assert "optim.lr (0.001 there, 0.002 here)" in line and "trainer.epochs (2 there, 1 here)" in line, line


def test_budget_epochs_and_trainer_epochs_hash_alike(compose_cfg):
    a, b = compose_cfg("budget=smoke", "budget.epochs=5"), compose_cfg("budget=smoke", "trainer.epochs=5")
    assert a.budget.epochs != b.budget.epochs and a.trainer.epochs == b.trainer.epochs == 5
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(compose_cfg("budget=smoke", "trainer.epochs=6"))


PILOT_RUN = ROOT / "results" / "cifar10-pilot" / "none_seed0_n10000"


@pytest.mark.skipif(not (PILOT_RUN / "metrics.json").is_file(), reason="needs the committed pilot study")
def test_a_committed_run_hashed_by_the_earlier_function_is_still_skipped(compose_cfg):
    """results/cifar10-pilot was hashed with the budget preset in the hash; the same command must still find
    its runs finished (the Makefile's study-pilot overrides for 10,000 images)."""
    cfg = compose_cfg("regularizer=none", "seed=0", "budget=cpu", "trainer.precision=fp32", "data.test_size=2000",
                      "data.val_size=500", "study=cifar10-pilot", "data.train_size=10000", "trainer.epochs=80",
                      "data.root=../shared/datasets/cifar10-jpg.tar.gz")
    assert metrics(PILOT_RUN)["config_hash"] != config_hash(cfg), "the pilot's recorded hash is the earlier one"
    assert RunDir(PILOT_RUN).state(config_hash(cfg), cfg=cfg) is State.COMPLETED
    other = compose_cfg("regularizer=none", "seed=0", "budget=cpu", "trainer.precision=fp32", "data.test_size=2000",
                        "data.val_size=500", "data.train_size=10000", "trainer.epochs=81",
                        "data.root=../shared/datasets/cifar10-jpg.tar.gz")
    with pytest.raises(ConfigError, match=r"trainer.epochs \(80 there, 81 here\)"):
        RunDir(PILOT_RUN).state(config_hash(other), cfg=other)


def test_a_run_recorded_with_an_earlier_hash_is_skipped_by_a_rerun(finished_run, env):
    run_dir = copy_run(finished_run, env)
    old = metrics(run_dir) | {"config_hash": "0123456789abcdef", "settings_hash": "fedcba9876543210"}
    (run_dir / "metrics.json").write_text(json.dumps(old))
    proc = train("regularizer=none", env=env)
    assert "none_seed0: skipped (completed" in proc.stdout + proc.stderr
    assert metrics(run_dir) == old
    runs, _ = C.collect_study(run_dir.parent)  # the report pools it by today's hash of its config.yaml
    today, _ = C.collect_study(finished_run.parent)
    assert runs.iloc[0]["included"] and runs.iloc[0]["settings_hash"] == today.iloc[0]["settings_hash"]


HOLD_TEMP = """
import fcntl, sys, time
f = open(sys.argv[1], "wb")
fcntl.flock(f, fcntl.LOCK_EX)  # as a live atomic write holds its temp file
print("held", flush=True)
time.sleep(60)
"""


def test_orphan_temp_files_are_removed_on_the_next_start_but_not_a_live_writers(finished_run, env):
    run_dir = copy_run(finished_run, env)
    cache = Path(env["ABLATION_CACHE"])
    cache.mkdir(parents=True)
    orphans = [run_dir / ".checkpoint.pt.x1y2.tmp", cache / ".fake-0123.pt.a1b2.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half a file")
    live = cache / ".fake-0123.pt.c3d4.tmp"
    writer = subprocess.Popen([sys.executable, "-c", HOLD_TEMP, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        train("regularizer=none", env=env)
        assert not any(o.exists() for o in orphans), "the killed writes' temp files are gone"
        assert live.exists(), "a temp file that a live process writes is kept"
    finally:
        writer.kill()
        writer.wait()
    assert remove_stale_temps(cache) == [live], "once its writer is gone, it is stale too"


def test_a_sweep_skips_runs_another_process_holds_and_lists_them(env):
    results = Path(env["ABLATION_RESULTS"])
    held = results / "main" / "none_seed0"
    held.mkdir(parents=True)
    (held / "train.log").write_text("the holder's log\n")
    holder = lock_holder(held)
    try:
        proc = train("-m", "seed=0,1", env=env)
        single = train("regularizer=none", env=env, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert metrics(results / "main" / "none_seed1")["status"] == "completed", "the sweep went on"
    assert not (held / "metrics.json").exists()
    assert "skipped 1 run(s) that another live process holds: none_seed0" in proc.stderr
    one_line_error(single, f"is locked by process {holder.pid}")
    assert (held / "train.log").read_text() == "the holder's log\n", "no line of the other processes in its log"
