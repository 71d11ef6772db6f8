"""End to end: real Hydra multiruns in subprocesses, on a generated ImageFolder, smoke budget."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import train

RUN_FILES = ("config.yaml", "history.csv", "metrics.json", "model.pt", "recon_final.png", "samples.png",
             ".hydra/config.yaml")
TIMING_KEYS = {"images_per_s", "train_time_s", "wall_time_s"}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def two_run_study(tmp_path_factory, image_folder):
    import os
    tmp = tmp_path_factory.mktemp("e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(ABLATION_DATA=str(image_folder), ABLATION_RESULTS=str(tmp / "results"),
               ABLATION_CACHE=str(tmp / "cache"), WANDB_MODE="disabled")
    proc = train("-m", "regularizer=none,all", "trainer.image_interval=1", env=env)
    return tmp / "results" / "main", env, proc


def test_two_run_multirun_writes_every_output(two_run_study):
    study, _, proc = two_run_study
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == ["none_seed0", "wd-do-bn-beta-aug_seed0"]
    for run in ("none_seed0", "wd-do-bn-beta-aug_seed0"):
        d = study / run
        for name in RUN_FILES:
            assert (d / name).is_file(), f"{run} lacks {name}"
        assert sorted(p.name for p in d.glob("recon_epoch*.png")) == ["recon_epoch001.png", "recon_epoch002.png"]
        for png in d.glob("*.png"):
            with Image.open(png) as im:
                assert im.format == "PNG" and im.width > 32
        m = metrics(d)
        assert m["status"] == "completed" and m["epochs_completed"] == 2 and m["run_name"] == run
        assert m["budget"] == "smoke" and m["images_per_s"] > 0 and m["wall_time_s"] > 0
        assert m["precision"] == "fp32", "precision=auto is fp32 on the CPU"
        for key in ("test_recon", "test_kl", "test_loss", "trainsub_recon", "mse01", "psnr", "neg_elbo",
                    "bits_per_dim", "active_units", "probe_acc", "gen_gap", "max_gen_gap", "best_epoch"):
            assert m[key] is not None, key
        assert not (d / "checkpoint.pt").exists(), "a completed run drops its checkpoint"
        h = pd.read_csv(d / "history.csv")
        epochs = h[h.kind == "epoch"]
        assert epochs.epoch.tolist() == [1, 2]
        assert {"train_recon", "train_kl", "test_recon", "test_kl", "trainsub_recon", "gen_gap"} <= set(h.columns)
        assert epochs.test_recon.iloc[-1] == pytest.approx(m["test_recon"], rel=1e-9)
    flags = metrics(study / "wd-do-bn-beta-aug_seed0")
    assert all(flags[f"reg_{r}"] for r in ("weight_decay", "dropout", "batchnorm", "beta", "augmentation"))
    assert "img/s" in proc.stdout + proc.stderr, "progress lines show throughput"


def test_same_seed_gives_same_metrics(two_run_study):
    study, env, _ = two_run_study
    train("-m", "regularizer=none,all", "trainer.image_interval=1", "study=again", env=env)
    again = study.parent / "again"
    for run in ("none_seed0", "wd-do-bn-beta-aug_seed0"):
        a, b = metrics(study / run), metrics(again / run)
        for key in set(a) - TIMING_KEYS - {"study", "wandb_id"}:  # the study names the W&B run
            assert a[key] == b[key], (run, key)


def test_rerun_skips_completed_runs(two_run_study):
    study, env, _ = two_run_study
    before = {p: p.stat().st_mtime_ns for p in study.glob("*/model.pt")}
    proc = train("-m", "regularizer=none,all", "trainer.image_interval=1", env=env)
    out = proc.stdout + proc.stderr
    assert out.count("skipped (completed, config hash") == 2, "one log line per skipped run"
    rows = re.findall(r"^\s*\d+\s+(\S+)\s+skipped \(completed\)", out, flags=re.M)
    assert rows == ["none_seed0", "wd-do-bn-beta-aug_seed0"], "and the sweep's table says so"
    assert {p: p.stat().st_mtime_ns for p in study.glob("*/model.pt")} == before


def test_seeds_multiply_a_sweep(env):
    train("-m", "regularizer=none,all", "seed=0,1", "trainer.epochs=1", "data.train_size=64", env=env)
    study = Path(env["ABLATION_RESULTS"]) / "main"
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == [
        "none_seed0", "none_seed1", "wd-do-bn-beta-aug_seed0", "wd-do-bn-beta-aug_seed1"]
    assert metrics(study / "none_seed0")["test_recon"] != metrics(study / "none_seed1")["test_recon"]


def test_a_dose_sweeps_runs_are_named_by_their_directories(env):
    """Each strength of a dose sweep has its own directory, and that name is the run's name in its
    metrics.json and log lines, so the strengths are told apart wherever runs are listed."""
    proc = train("-m", "+sweep=dose_beta", "beta.value=1,2", "trainer.epochs=1", "data.train_size=32",
                 "data.test_size=16", "trainer.checkpoint=false", env=env)
    study = Path(env["ABLATION_RESULTS"]) / "main"
    names = ["beta_seed0_beta1.0", "beta_seed0_beta2.0"]
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == names
    for name in names:
        assert metrics(study / name)["run_name"] == name
        assert re.search(rf"{re.escape(name)}: completed", proc.stdout + proc.stderr), name


def test_factorial_sweep_runs_all_32_combinations(env):
    """The glob smoke test: every combination of the five groups as one multirun."""
    train("+sweep=factorial", "trainer.epochs=1", "data.train_size=32", "data.test_size=16",
          "model.latent_dim=4", "trainer.checkpoint=false", env=env, timeout=900)
    study = Path(env["ABLATION_RESULTS"]) / "main"
    runs = [p for p in study.iterdir() if p.is_dir()]
    assert len(runs) == 32
    flags = {tuple(metrics(p)[f"reg_{r}"] for r in ("weight_decay", "dropout", "batchnorm", "beta",
                                                     "augmentation")) for p in runs}
    assert len(flags) == 32
    assert all(metrics(p)["status"] == "completed" for p in runs)


@pytest.mark.parametrize("override,message", [
    ("dropout.p=1.5", "dropout.p=1.5 is outside [0, 1)"),
    ("beta.value=-2", "beta.value=-2.0 is negative"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("trainer.device=gpu", "trainer.device='gpu' is not a device; use trainer.device=auto, cpu, cuda or cuda:N"),
])
def test_bad_values_give_one_clear_error_before_training(env, override, message):
    proc = train(override, env=env, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(Path(env["ABLATION_RESULTS"]).rglob("metrics.json")), "refused before any run started"


def test_missing_data_root_is_named(env, tmp_path):
    proc = train(f"data.root={tmp_path}/absent", "data.download=false", env=env, check=False)
    assert proc.returncode == 2
    assert f"{tmp_path}/absent" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(Path(env["ABLATION_RESULTS"]).rglob("metrics.json")), "no run files for a bad data root"


def test_images_the_model_cannot_take_are_named(env, tmp_path):
    from ablation.synthetic import make_imagefolder

    data = make_imagefolder(tmp_path / "odd", 8, 4, size=20)
    proc = train(f"data.root={data}", env=env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "are 20x20 pixels" in proc.stderr and "multiple of 8" in proc.stderr
    assert not list(Path(env["ABLATION_RESULTS"]).rglob("metrics.json")), "refused before any run started"


def test_unknown_option_gets_hydras_message(env):
    proc = train("dropout=maybe", env=env, check=False)
    assert proc.returncode == 1
    assert "Could not find 'dropout/maybe'" in proc.stderr and "Available options in 'dropout'" in proc.stderr


def test_compile_is_refused_on_cpu(env):
    proc = train("trainer.compile=true", "trainer.device=cpu", env=env, check=False)
    assert proc.returncode == 2 and "trainer.compile=true is supported on CUDA only" in proc.stderr
    assert not list(Path(env["ABLATION_RESULTS"]).rglob("metrics.json")), "refused before any run started"


def test_bf16_on_cpu_trains_where_the_cpu_has_bf16_and_is_refused_elsewhere(env):
    from ablation.runtime import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    proc = train("trainer.precision=bf16", "trainer.device=cpu", "regularizer=all", "trainer.compile=false",
                 env=env, check=native)
    runs = list(Path(env["ABLATION_RESULTS"]).rglob("metrics.json"))
    if not native:
        assert proc.returncode == 2 and "trainer.precision=bf16 needs bf16 instructions" in proc.stderr
        assert "trainer.precision=fp32" in proc.stderr and not runs
        return
    assert len(runs) == 1
    m = json.loads(runs[0].read_text())
    assert m["status"] == "completed" and m["precision"] == "bf16" and m["device"] == "cpu"
    for key in ("test_recon", "test_kl", "trainsub_recon", "psnr", "neg_elbo"):
        assert isinstance(m[key], float) and m[key] == m[key] and abs(m[key]) < 1e6, key  # finite numbers
    assert m["test_recon"] > 0 and m["test_kl"] >= 0


def test_a_smoke_run_writes_every_final_measure(env):
    """Every metric of FINAL_METRICS is in metrics.json: a finite number, or null with its reason."""
    from ablation.metrics import FINAL_METRICS, METRICS

    train("regularizer=all", env=env)
    m = json.loads((Path(env["ABLATION_RESULTS"]) / "main" / "wd-do-bn-beta-aug_seed0" / "metrics.json").read_text())
    skipped = m.get("measures_skipped", {})
    for key in FINAL_METRICS:
        assert key in m, key
        if m[key] is None:
            assert skipped.get(key), f"{key} is null without a reason"
        else:
            assert math.isfinite(m[key]), (key, m[key])
    spectrum = m["kl_spectrum"]
    assert len(spectrum) == 128 and spectrum == sorted(spectrum, reverse=True) and "kl_spectrum" in METRICS
    assert abs(sum(spectrum) - m["test_kl"]) <= 1e-3 * max(1.0, m["test_kl"])
