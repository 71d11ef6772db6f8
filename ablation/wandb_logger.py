"""W&B logging: one W&B run per training run, never a prompt, never a hang.

Mode rules (`logger.mode`), shared by training runs and `make report`:
  * the WANDB_MODE environment variable, when set, wins;
  * `auto` goes online when wandb itself finds credentials (WANDB_API_KEY, a netrc entry for the
    host it would use, the settings file's api_key) and offline otherwise, and says so in the log,
    with the `wandb sync` command;
  * `online` without credentials logs offline instead of prompting for a login; with them, init
    is bounded by `logger.init_timeout`, and if it fails the run falls back to a fresh offline run
    with the same id and config, with a warning, and goes on;
  * `disabled` writes nothing.
The local files in the run directory never depend on W&B.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from .config import LoggerConfig

try:
    import wandb
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth
except ImportError:  # e.g. a GPU machine whose image lacks it: the local files are the record
    wandb = None

log = logging.getLogger(__name__)

NO_LOGIN = "logging offline instead of prompting for a login"
ARTIFACT_NAME_MAX = 128  # W&B's limit on artifact names
# history.csv's columns -> the W&B history keys the trainer logs them under, by row kind
HISTORY_KEYS = {
    "step": {"train_loss": "train/loss", "train_recon": "train/recon", "train_kl": "train/kl",
             "grad_norm": "train/grad_norm", "epoch": "epoch"},
    "epoch": {"test_recon": "test/recon", "test_kl": "test/kl", "test_loss": "test/loss",
              "trainsub_recon": "trainsub/recon", "trainsub_kl": "trainsub/kl", "trainsub_loss": "trainsub/loss",
              "val_recon": "val/recon", "val_kl": "val/kl", "gen_gap": "gen_gap", "train_loss": "train/epoch_loss",
              "images_per_s": "train/images_per_s", "epoch": "epoch"},
}


def has_credentials() -> bool:
    """True when wandb finds an API key for the host it would use, where it would look: WANDB_API_KEY,
    the netrc entry (NETRC or ~/.netrc) for WANDB_BASE_URL, the settings file's base_url or wandb's
    default host, or the settings file's api_key. This is wandb's own lookup (the one `wandb.login` and
    `wandb.init` run) without storing, printing or verifying what it finds: no prompt, no network."""
    if wandb is None:
        return False
    settings = wandb_setup.singleton().settings
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    try:
        auth = wbauth.authenticate_session(host=host, source="ablation", prompt=False, update_session=False)
    except wandb.errors.AuthenticationError as exc:  # e.g. a malformed key
        log.warning("W&B credentials found but unusable (%s)", exc)
        return False
    return auth is not None and auth.host.is_same_url(host)


def resolve_mode(requested: str) -> tuple[str, str]:
    """The W&B mode to use and why: (online|offline|disabled, reason)."""
    env = os.environ.get("WANDB_MODE")
    if env:
        mode, reason = {"dryrun": "offline", "run": "online"}.get(env, env), f"WANDB_MODE={env} is set"
    elif requested != "auto":
        mode, reason = requested, f"logger.mode={requested}"
    else:
        mode = None
    if mode == "online" and not has_credentials():  # wandb would ask for a login on a terminal
        return "offline", f"{reason} but no W&B credentials (WANDB_API_KEY or `wandb login`) were found; {NO_LOGIN}"
    if mode is not None:
        return mode, reason
    if has_credentials():
        return "online", "logger.mode=auto and W&B credentials are configured"
    return "offline", "logger.mode=auto and no W&B credentials (WANDB_API_KEY or netrc login) were found"


def safe_name(*parts: str) -> str:
    """A W&B artifact name (or run id) from parts such as ("model", study, run_name), joined by '-':
    characters other than letters, digits, '-', '_' and '.' become '-', and the name is cut to W&B's
    128 characters for artifact names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts))[:ARTIFACT_NAME_MAX]


def study_logger_config(study_dir: Path):
    """The W&B settings (`logger.*`) the study's training runs used, read from their config.yaml; the
    most common one when they differ, with a warning; the schema's defaults (LoggerConfig) without any."""
    found = []
    for path in sorted(Path(study_dir).glob("*/config.yaml")):
        cfg = OmegaConf.load(path).get("logger")
        if cfg is not None and cfg.get("backend") == "wandb":
            found.append((cfg.get("project"), cfg.get("entity"), cfg.get("mode"), cfg.get("init_timeout")))
    if not found:
        defaults = LoggerConfig()
        project, entity, mode, timeout = defaults.project, defaults.entity, defaults.mode, defaults.init_timeout
    else:
        counts = Counter(found)
        (project, entity, mode, timeout), _ = counts.most_common(1)[0]
        if len(counts) > 1:
            log.warning("%s: its runs used several W&B projects/entities %s; the report goes to %s/%s",
                        study_dir, sorted({(p, e) for p, e, _, _ in counts}, key=str), entity, project)
    return OmegaConf.create({"backend": "wandb", "project": project, "entity": entity, "mode": mode,
                             "tags": [], "init_timeout": timeout})


def _table_value(value):
    """A table cell as W&B stores it: numbers stay numbers, NaN and missing values are null."""
    if isinstance(value, (list, tuple, dict)):
        return str(value)
    if pd.isna(value):
        return None
    if hasattr(value, "item"):  # a numpy scalar
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def history_rows(rows: list[dict]) -> dict[int, dict]:
    """history.csv's rows (the trainer's step and epoch rows) as the W&B history they were logged as:
    {step: {W&B key: value}}, the rows of one step merged, as W&B merges the log calls of one step."""
    out: dict[int, dict] = {}
    for row in rows:
        keys = HISTORY_KEYS.get(row.get("kind"), {})
        values = {wb: row[col] for col, wb in keys.items() if col in row and not pd.isna(row[col])}
        out.setdefault(int(row["step"]), {}).update(values)
    return dict(sorted(out.items()))


class NullLogger:
    """Logs nothing: `logger=none`, or W&B disabled."""

    run = None

    def log(self, data: dict, step: int | None = None) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        pass

    def log_table(self, key: str, frame) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        pass

    def resend_history(self, rows: list[dict]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """A thin wrapper over one `wandb.Run`."""

    def __init__(self, run) -> None:
        self.run = run
        self._row_open = False  # a history row logged with step= that W&B has not written yet

    def log(self, data: dict, step: int | None = None) -> None:
        self.run.log(data, step=step)
        self._row_open = step is not None

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        self.run.log({k: wandb.Image(str(p), caption=Path(p).name) for k, p in images.items()}, step=step)
        self._row_open = step is not None

    def log_table(self, key: str, frame) -> None:
        frame = frame.reset_index(drop=True)
        data = [[_table_value(v) for v in row] for row in frame.itertuples(index=False, name=None)]
        self.run.log({key: wandb.Table(columns=[str(c) for c in frame.columns], data=data, allow_mixed_types=True)})

    def summary(self, metrics: dict) -> None:
        if self._row_open:  # write the open row now: at finish() it would overwrite the keys it shares
            self.run.log({}, commit=True)
            self._row_open = False
        self.run.summary.update({k: v for k, v in metrics.items() if v is not None})

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        self.run.log_artifact(str(path), name=name, type=kind)

    def resend_history(self, rows: list[dict]) -> None:
        """On a resume: log again the history rows up to the checkpoint (history.csv's rows, as the
        checkpoint holds them) that this W&B run lacks, so that its history equals history.csv. A killed
        attempt's W&B run may hold nothing; a resumed online run holds the steps before its
        `starting_step`, which W&B would drop anyway (its steps only go forward). The reconstruction
        grids of those epochs stay in the run directory only."""
        sent = 0
        for step, values in history_rows(rows).items():
            if step >= self.run.starting_step:
                self.log(values, step=step)
                sent += 1
        log.info("W&B: re-sent %d history steps from before the checkpoint", sent)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def start(cfg_logger, *, run_dir: Path, name: str, group: str, job_type: str, tags: list[str],
          config: dict[str, Any], run_id: str | None = None) -> NullLogger:
    """Start a W&B run by the mode rules above, or return a NullLogger."""
    if cfg_logger.backend != "wandb":
        return NullLogger()
    os.environ.setdefault("WANDB_SILENT", "true")
    mode, reason = resolve_mode(cfg_logger.mode)
    if mode == "disabled":
        log.info("W&B disabled (%s)", reason)
        return NullLogger()
    if wandb is None:
        log.warning("logger=wandb but the wandb package is not installed; training without W&B "
                    "(pip install wandb, or pass logger=none)")
        return NullLogger()

    wandb_dir = Path(run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(project=cfg_logger.project, entity=cfg_logger.entity, dir=str(wandb_dir), name=name,
                  group=group, job_type=job_type, tags=tags, config=config, id=run_id, resume="allow",
                  reinit="create_new")

    def init(m: str):
        settings = wandb.Settings(init_timeout=float(cfg_logger.init_timeout), console="off",
                                  silent=True, x_disable_stats=True)
        return wandb.init(mode=m, settings=settings, **kwargs)

    fallback = False
    if mode == "online":
        try:
            run = init("online")
            log.info("W&B online (%s): %s", reason, run.url)
            return WandbLogger(run)
        except Exception as exc:  # no network, bad key, timeout: keep training, log offline
            log.warning("W&B online init failed (%s: %s); falling back to offline mode", type(exc).__name__, exc)
            reason, fallback = "online init failed", True
            # wandb's service still holds the run id of the failed init ("run ID is in use"): stop it,
            # so that the offline run can take the same id
            wandb.teardown()
    try:
        run = init("offline")
    except Exception as exc:
        if not fallback:
            raise
        log.warning("W&B offline init failed too (%s: %s); training without W&B, the local files are the "
                    "record", type(exc).__name__, exc)
        return NullLogger()
    offline_dir = Path(run.dir).parent
    asked = os.environ.get("WANDB_MODE") or cfg_logger.mode
    say = log.warning if asked in ("online", "run") else log.info  # online was asked for and not had
    say("W&B offline (%s). Upload later with: wandb sync %s", reason, offline_dir)
    return WandbLogger(run)
