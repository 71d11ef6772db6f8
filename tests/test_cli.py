"""The command line as a user meets it: --help, --cfg job, keys outside the schema, errors printed once,
Ctrl-C and SIGTERM, OMP_NUM_THREADS and shell completion, each through a real `python -m ablation.train`.

    .venv/bin/python -m pytest tests/test_cli.py -q
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ablation import config as C
from ablation.runtime import choose_threads, prepare
from conftest import ROOT, run_module, train

# Tiny end-of-run measures: the runs below check the command line, not the numbers.
QUICK = ("data.train_size=64", "data.test_size=64", "eval.classifier_epochs=1", "eval.sample_images=64",
         "eval.iw_images=16", "eval.iw_samples=4")


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_help_lists_the_commands_the_groups_and_the_config(env):
    proc = run_module("ablation.train", "--help", env=env)
    out = proc.stdout
    for command in ("-m regularizer=none,all", "-m +sweep=factorial", "--cfg job", "make report"):
        assert command in out, command
    assert "budget: auto, cpu, paper, smoke" in out and "dropout: off, on" in out
    assert "factorial" in out.split("\nsweep: ", 1)[1].split("\n", 1)[0]
    assert "trainer:\n  epochs:" in out, "the composed config follows"
    assert "Powered by Hydra" not in out


def test_cfg_job_shows_what_budget_auto_resolves_to_here(env):
    proc = run_module("ablation.train", "--cfg", "job", "logger=none", env=env)
    assert "???" not in proc.stdout
    preset = OmegaConf.load(C.CONF_DIR / "budget" / f"{C.auto_budget()}.yaml")
    budget = yaml.safe_load(proc.stdout)["budget"]
    assert budget["name"] == "auto"
    assert (budget["epochs"], budget["width"]) == (preset.epochs, preset.width)
    kept = yaml.safe_load(run_module("ablation.train", "--cfg", "job", "budget.epochs=3", env=env).stdout)
    assert kept["budget"]["epochs"] == 3 and kept["budget"]["width"] == preset.width


def test_budget_auto_runs_hash_as_their_preset(compose_cfg):
    """An auto run is hashed and recorded as the preset it resolves to, as before: the committed runs'
    hashes stay valid."""
    here = C.auto_budget()
    auto, explicit = compose_cfg(), compose_cfg(f"budget={here}")
    assert prepare(auto)[1] == prepare(explicit)[1] == here
    assert OmegaConf.to_container(auto) == OmegaConf.to_container(explicit)
    assert C.config_hash(auto) == C.config_hash(explicit) and C.settings_hash(auto) == C.settings_hash(explicit)
    # a run on the other kind of device gets the other preset; explicit fields stay
    other = "cpu" if here == "paper" else "paper"
    cfg = compose_cfg("budget.epochs=7")
    assert C.resolve_budget(cfg, cuda=other == "paper") == other
    preset = OmegaConf.load(C.CONF_DIR / "budget" / f"{other}.yaml")
    assert (cfg.budget.name, cfg.budget.epochs, cfg.budget.width) == (other, 7, preset.width)


@pytest.mark.parametrize("override,message", [
    ("+dropuot=on", "error: unknown key 'dropuot' (did you mean dropout?)"),
    ("dropuot=on", "error: unknown key 'dropuot' (did you mean dropout?)"),
    ("+trainer.lr=0", "error: unknown key 'trainer.lr' (did you mean optim.lr?)"),
    ("trainer.epoch=3", "error: unknown key 'trainer.epoch' (did you mean trainer.epochs?)"),
])
def test_keys_outside_the_schema_are_refused_in_one_line(env, override, message):
    proc = train(override, env=env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert message not in proc.stdout
    assert not list(Path(env["ABLATION_RESULTS"]).rglob("metrics.json")), "refused before any run started"


def test_a_key_a_config_file_adds_is_refused_too(compose_cfg):
    cfg = compose_cfg("budget=smoke", "+dropuot=on")
    with pytest.raises(C.ConfigError, match=r"unknown key 'dropuot' \(did you mean dropout\?\)"):
        C.validate(cfg)


def test_groups_and_hydra_keys_still_pass(env):
    proc = run_module("ablation.train", "--cfg", "job", "+sweep=factorial", "hydra/launcher=joblib",
                      "hydra.launcher.n_jobs=2", "regularizer=all", "dropout.p=0.2", env=env)
    assert yaml.safe_load(proc.stdout)["dropout"]["p"] == 0.2 and proc.stderr == ""


def test_an_error_is_printed_once(env):
    proc = train("optim.lr=0", env=env, check=False)
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).count("optim.lr=0.0 must be > 0") == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], "one line"


def _wait_for_epoch(proc: subprocess.Popen, run_dir: Path, epoch: int, timeout: float = 240) -> None:
    """Until history.csv holds `epoch` and a checkpoint is written."""
    end = time.monotonic() + timeout
    history = run_dir / "history.csv"
    while time.monotonic() < end and proc.poll() is None:
        if (run_dir / "checkpoint.pt").exists() and history.exists() and f"\nepoch,{epoch}," in history.read_text():
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no epoch {epoch} with a checkpoint within {timeout} s: {proc.communicate()}")


def _foreground_signals() -> None:
    """In the child: SIGINT's default action, as a command typed at a terminal has it. A shell's background
    job (`bash .ci/run &`) ignores SIGINT, every process it starts inherits that, and Python then raises
    no KeyboardInterrupt: the run would train on, as a backgrounded run rightly does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_so_in_one_line_and_a_rerun_resumes_it(env, signum, code):
    # Far more epochs than can pass before the signal, however slowly this test polls on a loaded machine.
    args = ["budget=smoke", "logger=none", "trainer.epochs=100000", "trainer.checkpoint_every_s=0",
            "trainer.progress_every_s=0", *QUICK]
    run_dir = Path(env["ABLATION_RESULTS"]) / "main" / "none_seed0"
    command = [sys.executable, "-m", "ablation.train", *args]
    started = []
    try:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_foreground_signals)
        started.append(proc)
        _wait_for_epoch(proc, run_dir, 1)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
        m = metrics(run_dir)
        assert proc.returncode == code
        assert m["status"] == "interrupted" and m["epochs_completed"] >= 1
        assert stderr.strip().splitlines() == [
            f"none_seed0: interrupted after epoch {m['epochs_completed']}; rerun the same command to resume"]
        assert (run_dir / "checkpoint.pt").exists(), "the checkpoint is kept"
        if signum == signal.SIGINT:  # the rerun resumes from that checkpoint and trains on; stopped the same way
            again = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, preexec_fn=_foreground_signals)
            started.append(again)
            _wait_for_epoch(again, run_dir, m["epochs_completed"] + 2)
            again.send_signal(signum)
            output, _ = again.communicate(timeout=120)
            assert f"resumed from checkpoint after epoch {m['epochs_completed']}" in output
            assert again.returncode == code and metrics(run_dir)["epochs_completed"] > m["epochs_completed"]
    finally:
        for child in started:  # a run the signal did not stop would train its 100,000 epochs
            if child.poll() is None:
                child.kill()
                child.communicate()


def test_omp_num_threads_is_respected_unless_trainer_threads_is_set(env, monkeypatch):
    proc = train("trainer.epochs=1", *QUICK, env=env | {"OMP_NUM_THREADS": "1"})
    assert metrics(Path(env["ABLATION_RESULTS"]) / "main" / "none_seed0")["threads"] == 1
    assert "(1 threads)" in proc.stdout
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(0, None) == 3 and choose_threads(2, None) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(C.ConfigError, match="OMP_NUM_THREADS='many'"):
        choose_threads(0, None)


def test_shell_completion_installs_for_bash(env):
    proc = run_module("ablation.train", "-sc", "install=bash", env=env)
    assert "complete" in proc.stdout and "hydra_bash_completion" in proc.stdout
