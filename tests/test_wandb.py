"""W&B logging, end to end: real wandb in offline mode, real training subprocesses, no mocks.

Every run below trains budget=smoke on a generated ImageFolder with W&B's directories, the
results and the data cache in tmp, no API key and an empty netrc, so nothing can go online.
What W&B wrote is read back from the run's `.wandb` file (tests/wandb_records.py) and checked
against the values the run itself wrote locally (metrics.json, history.csv).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
import wandb
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from ablation import report, wandb_logger
from ablation.regularizers import effective_dict, names
from ablation.synthetic import make_imagefolder
from wandb_records import offline_run_dirs, read_run, read_table, records

ROOT = Path(__file__).resolve().parent.parent
STUDY = "main"
# The study's W&B settings: not the defaults, so that the report run can be seen to take them over.
PROJECT, ENTITY = "vae-ablation-test", "test-team"
RUNS = {"none": "none_seed0", "all": "wd-do-bn-beta-aug_seed0"}
# budget=smoke: 2 epochs of train_size 256 in batches of 128 -> 2 optimizer steps an epoch.
EPOCHS, STEPS_PER_EPOCH = 2, 256 // 128
STEPS = EPOCHS * STEPS_PER_EPOCH
# One torch thread: the suite shares 2 cores with whatever else runs, and oversubscribed threads crawl.
COMMON = ("budget=smoke", "trainer.log_interval=1", "logger.log_interval=1", "trainer.threads=1")
# History keys: logged every step (log_interval=1), at each epoch end, and as images at the end.
STEP_KEYS = {"train/loss", "train/recon", "train/kl", "train/grad_norm", "epoch"}
EPOCH_KEYS = {"test/recon", "test/kl", "test/loss", "trainsub/recon", "trainsub/kl", "trainsub/loss", "gen_gap",
              "train/epoch_loss", "train/images_per_s", "epoch"}
FINAL_IMAGES = {"recon", "recon_final", "samples"}
WANDB_KEYS = {"_step", "_runtime", "_timestamp"}  # added by W&B to every row
# Wall-clock measurements: the only values that differ between two runs of one config.
TIMING_METRICS = {"wall_time_s", "train_time_s", "images_per_s"}
TIMING_COLUMNS = {"images_per_s", "epoch_time_s"}


# ---------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def wb_env(tmp_path_factory) -> dict:
    """Base environment: every W&B directory in tmp, no WANDB_* from outside, no key, empty netrc,
    and a generated ImageFolder of 256 train and 128 test images (budget=smoke's sizes)."""
    tmp = tmp_path_factory.mktemp("wandb-env")
    image_folder = make_imagefolder(tmp / "data", n_train=256, n_test=128)
    (tmp / "netrc").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ABLATION_"))}
    env.update(WANDB_DIR=str(tmp / "wandb-dir"), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
               WANDB_CONFIG_DIR=str(tmp / "wandb-config"), WANDB_DATA_DIR=str(tmp / "wandb-data"),
               NETRC=str(tmp / "netrc"), ABLATION_CACHE=str(tmp / "data-cache"), ABLATION_DATA=str(image_folder),
               HYDRA_FULL_ERROR="0")
    return env


def train(results: Path, *overrides: str, env: dict, check: bool = True, multirun: bool = False,
          **extra_env: str):
    """`python -m ablation.train [-m] budget=smoke ... <overrides>` writing under `results`."""
    cmd = [sys.executable, "-m", "ablation.train", *(["-m"] if multirun else []), *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT,
                          env=env | {"ABLATION_RESULTS": str(results)} | extra_env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                             f"--- stderr\n{proc.stderr[-3000:]}")
    return proc


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def one_offline_run(run_dir: Path):
    """The single offline W&B run inside a run directory, read back."""
    dirs = offline_run_dirs(run_dir / "wandb")
    assert len(dirs) == 1, f"expected one offline-run-* in {run_dir / 'wandb'}, found {dirs}"
    return read_run(dirs[0])


def assert_summary_written_last(rec) -> None:
    """The summary update holding the run's status comes after the last history row.

    W&B keeps the row of an explicit `step=` open until a later step is logged or the run
    finishes, then writes it and copies its values into the summary: a row still open when the
    run's metrics are put in the summary overwrites every key the two share (gen_gap) at finish."""
    kinds = [(r.WhichOneof("record_type"), r) for r in records(rec.path)]
    rows = [i for i, (k, _) in enumerate(kinds) if k == "history"]
    status = [i for i, (k, r) in enumerate(kinds)
              if k == "summary" and any(it.key == "status" for it in r.summary.update)]
    assert status, "no summary record carries the run's status"
    assert not rows or status[-1] > rows[-1], (
        f"history row {rec.history[-1]['_step']} was written after the run's summary, so its values won "
        f"(record {rows[-1]} > {status[-1]}); write the open row before the summary")


def assert_summary_matches(summary: dict, metrics: dict) -> None:
    """Every scalar of metrics.json is in the W&B summary with the same value."""
    wrong = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, (dict, list)):
            continue
        got = summary.get(key, "<missing>")
        if isinstance(value, float):
            same = isinstance(got, (int, float)) and got == pytest.approx(value, rel=1e-9, nan_ok=True)
        else:
            same = type(got) is type(value) and got == value  # True != 1 here
        if not same:
            wrong[key] = (got, value)
    assert not wrong, f"W&B summary != metrics.json, as (summary, metrics.json): {wrong}"


# ---------------------------------------------------------------------------------- the 2-run study

@pytest.fixture(scope="module")
def study(tmp_path_factory, wb_env) -> dict:
    """The 2-run study `-m regularizer=none,all` with WANDB_MODE=offline, its models logged as artifacts;
    {"none"|"all": (run dir, records)}."""
    results = tmp_path_factory.mktemp("study") / "results"
    train(results, "regularizer=none,all", f"logger.project={PROJECT}", f"logger.entity={ENTITY}",
          "logger.log_model=true", env=wb_env, multirun=True, WANDB_MODE="offline")
    return {k: (results / STUDY / name, one_offline_run(results / STUDY / name)) for k, name in RUNS.items()}


def test_multirun_writes_one_offline_run_per_run_dir(study):
    for key, name in RUNS.items():
        run_dir, rec = study[key]
        assert rec.path.parent.parent == run_dir / "wandb"
        assert rec.path.parent.name.startswith("offline-run-") and rec.path.name.startswith("run-")
        assert rec.exit_code == 0
    # the two runs are two W&B runs, not one resumed run
    assert study["none"][1].run_id != study["all"][1].run_id


@pytest.mark.parametrize("key", sorted(RUNS))
def test_run_identity_and_config(study, key):
    run_dir, rec = study[key]
    metrics = metrics_of(run_dir)
    assert rec.name == run_dir.name == RUNS[key]
    assert rec.group == STUDY
    assert rec.job_type == "train"
    assert (rec.project, rec.entity) == (PROJECT, ENTITY)
    assert rec.run_id == f"{STUDY}-{run_dir.name}-{metrics['config_hash'][:8]}"
    assert rec.artifacts == [(f"model-{STUDY}-{run_dir.name}", "model")]
    on = key == "all"
    assert rec.tags == (list(names()) if on else ["none"])
    for reg in names():  # the five flags as top-level booleans, beside the groups' own settings
        assert rec.config[f"reg_{reg}"] is on, (reg, rec.config[f"reg_{reg}"])
        assert rec.config[reg]["enabled"] is on
        assert metrics[f"reg_{reg}"] is on
    assert rec.config["dropout"]["p"] == (0.3 if on else 0.0)
    assert rec.config["beta"]["value"] == (4.0 if on else 1.0)
    # the rest of the resolved config
    assert rec.config["study"] == STUDY and rec.config["run_name"] == run_dir.name
    assert rec.config["budget"]["name"] == "smoke" and rec.config["budget"]["epochs"] == EPOCHS
    assert rec.config["trainer"]["log_interval"] == 1 and rec.config["logger"]["log_interval"] == 1


@pytest.mark.parametrize("key", sorted(RUNS))
def test_history_rows_and_values(study, key):
    """One W&B history row per optimizer step: W&B merges every log call that names the same step
    into one row (written once a later step is logged, or at finish), so the epoch-end metrics and
    the image grids join the row of the epoch's last step."""
    run_dir, rec = study[key]
    assert [row["_step"] for row in rec.history] == list(range(1, STEPS + 1))
    assert metrics_of(run_dir)["steps"] == STEPS
    for row in rec.history:
        step = row["_step"]
        expected = STEP_KEYS | WANDB_KEYS
        if step % STEPS_PER_EPOCH == 0:  # logger.image_interval=1: a grid every epoch (trainer.image_interval=5)
            expected |= EPOCH_KEYS | {"recon"}
        if step == STEPS:
            expected |= FINAL_IMAGES
        assert set(row) == expected, f"step {step}: {sorted(set(row) ^ expected)}"
        assert row["epoch"] == (step - 1) // STEPS_PER_EPOCH + 1
    assert_history_equals_csv(rec, run_dir, STEPS, EPOCHS)


def assert_history_equals_csv(rec, run_dir: Path, steps: int, epochs: int) -> None:
    """The W&B history's values are the ones in the run's own history.csv, row for row."""
    local = pd.read_csv(run_dir / "history.csv")
    by_step = {row["_step"]: row for row in rec.history}
    step_rows, epoch_rows = local[local.kind == "step"], local[local.kind == "epoch"]
    assert len(step_rows) == steps and len(epoch_rows) == epochs
    for r in step_rows.itertuples():
        wb = by_step[r.step]
        assert (wb["train/loss"], wb["train/recon"], wb["train/kl"], wb["train/grad_norm"]) == pytest.approx(
            (r.train_loss, r.train_recon, r.train_kl, r.grad_norm), rel=1e-9)
    for r in epoch_rows.itertuples():
        wb = by_step[r.step]
        assert (wb["test/recon"], wb["test/kl"], wb["test/loss"], wb["trainsub/recon"], wb["gen_gap"],
                wb["train/epoch_loss"]) == pytest.approx(
            (r.test_recon, r.test_kl, r.test_loss, r.trainsub_recon, r.gen_gap, r.train_loss), rel=1e-9)


@pytest.mark.parametrize("key", sorted(RUNS))
def test_summary_equals_metrics_json(study, key):
    run_dir, rec = study[key]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == rec.summary["status"] == "completed"
    assert_summary_matches(rec.summary, metrics)
    assert_summary_written_last(rec)


def test_report_run_takes_the_study_project_a_stable_id_and_numeric_tables(study, wb_env):
    """`make report` twice: one W&B run id (each report resumes it), in the training runs' project and
    entity, whose tables hold numbers (NaN as null), equal to runs.csv's."""
    study_dir = study["none"][0].parent
    for _ in range(2):
        subprocess.run([sys.executable, "-m", "ablation.report", str(study_dir)], cwd=ROOT, check=True, timeout=300,
                       env=wb_env | {"WANDB_MODE": "offline", "MPLBACKEND": "Agg"}, capture_output=True)
    first, second = (read_run(d) for d in offline_run_dirs(study_dir / "wandb"))
    assert first.run_id == second.run_id == report.report_run_id(study_dir, STUDY)
    assert first.run_id.startswith(f"report-{STUDY}-") and first.run_id != report.report_run_id(study_dir, "other")
    for rec in (first, second):
        assert (rec.project, rec.entity, rec.job_type, rec.group) == (PROJECT, ENTITY, "report", STUDY)
        assert rec.exit_code == 0
    logged = {k: read_table(second, v) for row in second.history for k, v in row.items()
              if isinstance(v, dict) and v.get("_type") == "table-file"}
    claims = next(t for k, t in logged.items() if k.startswith("claims/"))
    rows = [dict(zip(claims["columns"], row)) for row in claims["data"]]
    runs = pd.read_csv(study_dir / "runs.csv").set_index("run_name")
    for row in rows:  # one run a side: each mean is that run's value, its CI undefined (null)
        for side, run_name in (("none", RUNS["none"]), ("all", RUNS["all"])):
            value = runs.loc[run_name, row["primary"]]
            assert row[f"{side}_ci"] is None, row
            if math.isnan(value):  # a metric these 2-epoch runs do not measure
                assert row[f"{side}_mean"] is None and row[f"{side}_n"] == 0, row
            else:
                assert isinstance(row[f"{side}_mean"], float) and row[f"{side}_n"] == 1, row
                assert row[f"{side}_mean"] == pytest.approx(value, rel=1e-9)
    for key, table in logged.items():  # no number anywhere is a string
        for row in table["data"]:
            for cell in row:
                if isinstance(cell, str):
                    with pytest.raises(ValueError):
                        float(cell)


@pytest.mark.parametrize("key", sorted(RUNS))
def test_images_logged(study, key):
    _, rec = study[key]
    assert rec.has_image
    last = rec.history[-1]
    for name in FINAL_IMAGES:
        image = last[name]
        assert image["_type"] == "image-file" and image["format"] == "png"
        assert image["path"].startswith("media/images/") and image["path"] in rec.files
        assert (rec.path.parent / "files" / image["path"]).stat().st_size == image["size"]


def test_reader_agrees_with_wandb_and_spans_blocks(tmp_path, wb_env):
    """tests/wandb_records.py reads what wandb's own reader (`wandb leet inspect --json`) reads,
    on a log whose records span several 32 KiB blocks."""
    script = ("import wandb\n"
              "run = wandb.init(mode='offline', dir=r'%s', project='p', config={'big': 'x' * 100000},\n"
              "                 settings=wandb.Settings(console='off', silent=True, x_disable_stats=True))\n"
              "for i in range(300):\n"
              "    run.log({'i': i, 'pad': 'y' * 300})\n"
              "run.finish(exit_code=3)\n") % tmp_path
    env = wb_env | {"WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120, capture_output=True)
    (run_dir,) = offline_run_dirs(tmp_path)
    rec = read_run(run_dir)
    assert rec.path.stat().st_size > 3 * 32 * 1024
    assert rec.config["big"] == "x" * 100000
    assert [row["i"] for row in rec.history] == list(range(300))
    assert rec.exit_code == 3 and rec.summary["i"] == 299
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(rec.path)], env=env,
                         timeout=120, capture_output=True, text=True)
    if out.returncode != 0 and "No such command" in out.stderr:
        pytest.skip("this wandb has no `wandb leet inspect` to compare with")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["type"] for line in out.stdout.splitlines()] == rec.record_types


# ---------------------------------------------------------------------------------- disabled

@pytest.mark.parametrize("how", ["logger.mode=disabled", "WANDB_MODE=disabled"])
def test_disabled_writes_nothing_and_same_local_outputs(tmp_path, wb_env, study, how):
    results = tmp_path / "results"
    if how.startswith("logger."):
        train(results, "regularizer=none", how, env=wb_env)
    else:
        train(results, "regularizer=none", env=wb_env, WANDB_MODE="disabled")
    run_dir = results / STUDY / RUNS["none"]
    assert not [p for p in results.rglob("*wandb*")], "W&B files written although disabled"
    assert not Path(wb_env["WANDB_DIR"]).exists() or not offline_run_dirs(wb_env["WANDB_DIR"])
    assert "W&B disabled" in (run_dir / "train.log").read_text()
    # the local outputs are those of the same run with W&B on, to the number (same seed, CPU)
    on_dir = study["none"][0]
    on, off = metrics_of(on_dir), metrics_of(run_dir)
    assert off.keys() == on.keys()
    for key in on.keys() - TIMING_METRICS:
        expected = pytest.approx(on[key], rel=1e-6) if isinstance(on[key], float) else on[key]
        assert off[key] == expected, key
    h_on, h_off = pd.read_csv(on_dir / "history.csv"), pd.read_csv(run_dir / "history.csv")
    assert list(h_off.columns) == list(h_on.columns) and len(h_off) == len(h_on) == STEPS + EPOCHS
    keep = [c for c in h_on.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(h_off[keep], h_on[keep], rtol=1e-6)


# ---------------------------------------------------------------------------------- auto mode

@pytest.mark.parametrize("mode", ["auto", "online"])
def test_without_credentials_a_run_goes_offline(tmp_path, wb_env, mode):
    """auto and online alike: no key means an offline run, never a login prompt."""
    assert "WANDB_MODE" not in wb_env and "WANDB_API_KEY" not in wb_env
    results = tmp_path / "results"
    proc = train(results, "regularizer=none", f"logger.mode={mode}", env=wb_env)
    run_dir = results / STUDY / RUNS["none"]
    rec = one_offline_run(run_dir)
    assert rec.exit_code == 0 and rec.name == RUNS["none"]
    log = (run_dir / "train.log").read_text() + proc.stderr
    assert "W&B offline" in log and "no W&B credentials" in log
    assert f"wandb sync {rec.path.parent}" in log


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No WANDB_MODE, no key, an empty netrc, no settings file, the default W&B host; wandb's process-wide
    settings and session credentials are dropped before and after (wandb.teardown), so each test's files count."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    wandb.teardown()
    yield monkeypatch
    wandb.teardown()


@pytest.mark.parametrize("env,requested,mode", [
    ({"WANDB_MODE": "offline"}, "online", "offline"),  # WANDB_MODE wins
    ({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k" * 40}, "auto", "disabled"),
    ({"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40}, "disabled", "online"),
    ({"WANDB_MODE": "online"}, "auto", "offline"),  # no credentials: never a login prompt
    ({}, "online", "offline"),
    ({"WANDB_MODE": "dryrun"}, "auto", "offline"),  # wandb's legacy names
    ({"WANDB_API_KEY": "k" * 40}, "auto", "online"),
    ({}, "auto", "offline"),
    ({"WANDB_API_KEY": "k" * 40}, "offline", "offline"),  # an explicit mode is kept
    ({}, "disabled", "disabled"),
])
def test_resolve_mode(clean_env, env, requested, mode):
    for var, value in env.items():
        clean_env.setenv(var, value)
    got, reason = wandb_logger.resolve_mode(requested)
    assert got == mode
    if "WANDB_MODE" in env:
        assert "WANDB_MODE" in reason
    asked_online = env.get("WANDB_MODE") == "online" or ("WANDB_MODE" not in env and requested in ("online", "auto"))
    if asked_online and "WANDB_API_KEY" not in env:
        assert mode == "offline" and "no W&B credentials" in reason


def test_resolve_mode_auto_with_netrc_login(clean_env, tmp_path):
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_logger.resolve_mode("auto")[0] == "online"


OTHER_HOST = "https://wandb.example.com"


@pytest.mark.parametrize("netrc_host,base_url_env,settings,online", [
    ("default", None, {}, True),  # `wandb login` writes wandb's default host (not api.wandb.ai in 0.31)
    ("wandb.example.com", OTHER_HOST, {}, True),  # a server named by WANDB_BASE_URL
    ("wandb.example.com", None, {"base_url": OTHER_HOST}, True),  # ... or by the settings file
    ("wandb.example.com", None, {}, False),  # a login for another server than the one wandb would use
    ("default", OTHER_HOST, {}, False),
    (None, None, {"api_key": "k" * 40}, True),  # the settings file's api_key
    (None, None, {}, False),
])
def test_auto_mode_finds_credentials_where_wandb_does(clean_env, tmp_path, netrc_host, base_url_env, settings,
                                                      online):
    """Only local files: a netrc (NETRC) and a settings file (WANDB_CONFIG_DIR/settings); never online."""
    if netrc_host == "default":
        netrc_host = urlsplit(wandb.Settings().base_url).hostname
    if netrc_host:
        (tmp_path / "netrc").write_text(f"machine {netrc_host}\n  login user\n  password {'k' * 40}\n")
    if base_url_env:
        clean_env.setenv("WANDB_BASE_URL", base_url_env)
    if settings:
        (tmp_path / "wandb-config").mkdir()
        (tmp_path / "wandb-config" / "settings").write_text(
            "[default]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    assert wandb_logger.has_credentials() is online
    assert wandb_logger.resolve_mode("auto")[0] == ("online" if online else "offline")


# ---------------------------------------------------------------------------------- failures

# tests/faults/sitecustomize.py makes the run of the seed in ABLATION_FAULT fail (see there)
FAULT = {"PYTHONPATH": str(ROOT / "tests" / "faults")}

def test_raising_run_is_recorded_as_failed(tmp_path, wb_env):
    results = tmp_path / "results"
    proc = train(results, "study=fault", env=wb_env, check=False, WANDB_MODE="offline", **FAULT, ABLATION_FAULT="raise:0")
    assert proc.returncode != 0 and "injected fault" in proc.stderr
    run_dir = results / "fault" / RUNS["none"]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "failed"
    assert metrics["error"] == "RuntimeError: injected fault (ABLATION_FAULT=raise:0) at epoch 1"
    rec = one_offline_run(run_dir)
    assert rec.exit_code is not None and rec.exit_code != 0
    assert rec.summary["status"] == "failed" and rec.summary["error"] == metrics["error"]
    assert rec.history == []  # the fault fires in the first step, before anything is logged


def test_a_run_whose_wandb_cannot_start_is_recorded_as_failed(tmp_path, wb_env):
    """W&B cannot create its folder (a file stands in the way): the run ends 'failed', not 'running'."""
    results = tmp_path / "results"
    run_dir = results / "nowandb" / RUNS["none"]
    run_dir.mkdir(parents=True)
    (run_dir / "wandb").write_text("not a folder")
    proc = train(results, "study=nowandb", env=wb_env, check=False, WANDB_MODE="offline")
    assert proc.returncode != 0
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "failed" and metrics["error"], metrics


def test_diverged_run_is_recorded_as_diverged(tmp_path, wb_env):
    results = tmp_path / "results"
    train(results, "study=fault", env=wb_env, WANDB_MODE="offline", **FAULT, ABLATION_FAULT="nan_loss:0")  # exit 0
    run_dir = results / "fault" / RUNS["none"]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "diverged" and metrics["error"] == "non-finite loss at epoch 1, step 1"
    rec = one_offline_run(run_dir)
    assert rec.exit_code is not None and rec.exit_code != 0
    assert rec.summary["status"] == "diverged"
    assert_summary_matches(rec.summary, metrics)
    assert_summary_written_last(rec)
    assert [row["_step"] for row in rec.history] == [1] and math.isnan(rec.history[0]["train/loss"])


def test_a_killed_run_resumes_its_wandb_run_with_the_whole_history(tmp_path, wb_env):
    """SIGKILL after two epochs, then the same command again: the resumed W&B run has the same id and re-sends
    the history up to the checkpoint, so that its history equals history.csv (the killed attempt's .wandb
    file may hold nothing but its header); the model artifact's name carries the study."""
    results, study_name, epochs = tmp_path / "results", "resume/kill", 8
    args = ("regularizer=none", f"study={study_name}", f"budget.epochs={epochs}", "trainer.checkpoint_every_s=0",
            "logger.log_model=true")
    run_dir = results / study_name / RUNS["none"]
    env = wb_env | {"ABLATION_RESULTS": str(results), "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "ablation.train", *COMMON, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            history = run_dir / "history.csv"
            if (run_dir / "checkpoint.pt").exists() and history.exists() and \
                    (pd.read_csv(history).kind == "epoch").sum() >= 2:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before two epochs were in history.csv"
    assert metrics_of(run_dir)["status"] == "running"
    train(results, *args, env=wb_env, WANDB_MODE="offline")
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed" and metrics["epochs_completed"] == epochs
    killed, resumed = (read_run(d) for d in offline_run_dirs(run_dir / "wandb"))
    run_id = f"resume-kill-{RUNS['none']}-{metrics['config_hash'][:8]}"
    assert resumed.run_id == run_id and killed.run_id in ("", run_id)  # "": a header-only file
    assert killed.path.name == resumed.path.name == f"run-{run_id}.wandb"
    assert "resumed from checkpoint" in (run_dir / "train.log").read_text()
    steps = epochs * STEPS_PER_EPOCH
    assert [row["_step"] for row in resumed.history] == list(range(1, steps + 1))
    assert_history_equals_csv(resumed, run_dir, steps, epochs)
    assert resumed.exit_code == 0 and resumed.summary["status"] == "completed"
    assert resumed.artifacts == [(f"model-resume-kill-{RUNS['none']}", "model")]


def test_online_init_without_network_falls_back_to_an_offline_run_with_the_same_id(tmp_path, wb_env):
    """logger.mode=online with a key and no server (a closed local port): init gives up after
    logger.init_timeout, and the run trains on, logging to an offline W&B run with the id and config it
    would have had online."""
    results = tmp_path / "results"
    proc = train(results, "study=fallback", "logger.mode=online", "logger.init_timeout=2", env=wb_env,
                 WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="k" * 40)
    run_dir = results / "fallback" / RUNS["none"]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed"
    rec = one_offline_run(run_dir)
    assert rec.run_id == f"fallback-{RUNS['none']}-{metrics['config_hash'][:8]}"
    assert rec.exit_code == 0 and rec.name == RUNS["none"] and rec.group == "fallback"
    assert rec.config["study"] == "fallback" and rec.config["logger"]["mode"] == "online"
    assert [row["_step"] for row in rec.history] == list(range(1, STEPS + 1))
    assert_summary_matches(rec.summary, metrics)
    log = (run_dir / "train.log").read_text() + proc.stderr
    assert "falling back to offline mode" in log and "W&B offline (online init failed)" in log
    assert "is in use" not in log


def test_a_missing_wandb_package_is_one_warning_and_the_run_goes_on(tmp_path, wb_env):
    """As on a GPU machine whose image lacks wandb: logger=wandb degrades to the local files."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    results = tmp_path / "results"
    proc = train(results, "study=nowb", env=wb_env, WANDB_MODE="offline", PYTHONPATH=str(hide))
    run_dir = results / "nowb" / RUNS["none"]
    assert metrics_of(run_dir)["status"] == "completed"
    assert (proc.stdout + proc.stderr).count("the wandb package is not installed") == 1
    assert not (run_dir / "wandb").exists()


# ---------------------------------------------------------------------------------- W&B sweeps

WANDB_SWEEPS = ROOT / "conf" / "wandb_sweep"
HYDRA_SWEEPS = ROOT / "conf" / "sweep"
COMMAND_HEAD = ["${env}", "${interpreter}", "-m", "ablation.train"]


def wandb_grid(spec: dict) -> list[tuple[dict, list[str]]]:
    """Every grid point of a W&B sweep and the arguments an agent runs it with: wandb's own
    `${args_no_hyphens}` after the command's fixed arguments."""
    command = spec["command"]
    assert command[:len(COMMAND_HEAD)] == COMMAND_HEAD and command[-1] == "${args_no_hyphens}", command
    keys = list(spec["parameters"])
    points = []
    for values in itertools.product(*(spec["parameters"][k]["values"] for k in keys)):
        point = dict(zip(keys, values))
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args_no_hyphens"]
        points.append((point, command[len(COMMAND_HEAD):-1] + args))
    return points


def hydra_grid(name: str) -> list[list[str]]:
    """The overrides of every job of `python -m ablation.train -m +sweep=<name>`."""
    params = OmegaConf.load(HYDRA_SWEEPS / f"{name}.yaml").hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    lists = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [[f"+sweep={name}", *job] for job in itertools.product(*lists)]


def settings(cfg) -> tuple:
    """What a run computes with: the regularizers' effective values and the seed."""
    return json.dumps(effective_dict(cfg), sort_keys=True), cfg.seed


def test_a_wandb_sweep_for_the_factorial_and_each_dose_sweep():
    assert sorted(p.stem for p in WANDB_SWEEPS.glob("*.yaml")) == sorted(
        ["factorial", "dose_beta", "dose_dropout", "dose_weight_decay", "dose_augmentation"])


@pytest.mark.parametrize("name", sorted(p.stem for p in WANDB_SWEEPS.glob("*.yaml")))
def test_every_wandb_sweep_point_composes_to_its_settings(compose_cfg, name):
    """Each grid point's command line composes in Hydra to the grid point's regularizer settings, and the
    W&B sweep runs exactly the runs of the Hydra sweep of the same name, one run a point."""
    spec = yaml.safe_load((WANDB_SWEEPS / f"{name}.yaml").read_text())  # PyYAML, as `wandb sweep` reads it
    assert spec["method"] == "grid" and f"+sweep={name}" in spec["command"]
    seen = []
    for point, args in wandb_grid(spec):
        cfg = compose_cfg(*args)
        effective = effective_dict(cfg)
        for key, value in point.items():
            if key == "seed":
                assert cfg.seed == value
            elif "." in key:  # a dose: that regularizer on at that strength
                group, field = key.split(".")
                assert effective[group]["enabled"] and effective[group][field] == pytest.approx(float(value)), args
            else:  # a switch ('on'/'off') or a variant of the group
                assert effective[key]["enabled"] is (value != "off"), args
        seen.append(settings(cfg))
    assert len(set(seen)) == len(seen), "two grid points run the same settings"
    hydra_runs = [settings(compose_cfg(*job)) for job in hydra_grid(name)]
    assert sorted(seen) == sorted(hydra_runs)
