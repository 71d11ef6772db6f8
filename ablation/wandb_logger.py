"""W&B logging: one W&B run per training run, never a prompt, never a hang.

Mode rules (`logger.mode`), shared by training runs and `make report`:
  * the WANDB_MODE environment variable, when set, wins;
  * `auto` goes online when credentials exist (WANDB_API_KEY or a netrc entry for the W&B
    host) and offline otherwise, and says so in the log, with the `wandb sync` command;
  * `online` without credentials logs offline instead of prompting for a login; with them, init
    is bounded by `logger.init_timeout`, and if it fails the run falls back to offline with a
    warning and goes on;
  * `disabled` writes nothing.
The local files in the run directory never depend on W&B.
"""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def has_credentials() -> bool:
    """True when an API key is configured in the environment or in ~/.netrc (or $NETRC)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


NO_LOGIN = "logging offline instead of prompting for a login"


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
        import wandb

        self.run.log({k: wandb.Image(str(p), caption=Path(p).name) for k, p in images.items()}, step=step)
        self._row_open = step is not None

    def log_table(self, key: str, frame) -> None:
        import wandb

        self.run.log({key: wandb.Table(dataframe=frame.reset_index(drop=True).astype(str))})

    def summary(self, metrics: dict) -> None:
        if self._row_open:  # write the open row now: at finish() it would overwrite the keys it shares
            self.run.log({}, commit=True)
            self._row_open = False
        self.run.summary.update({k: v for k, v in metrics.items() if v is not None})

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        self.run.log_artifact(str(path), name=name, type=kind)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def start(cfg_logger, *, run_dir: Path, name: str, group: str, job_type: str, tags: list[str],
          config: dict[str, Any], run_id: str | None = None) -> NullLogger:
    """Start a W&B run by the mode rules above, or return a NullLogger."""
    if cfg_logger.backend != "wandb":
        return NullLogger()
    mode, reason = resolve_mode(cfg_logger.mode)
    if mode == "disabled":
        log.info("W&B disabled (%s)", reason)
        return NullLogger()
    try:
        import wandb
    except ImportError:  # e.g. a GPU machine whose image lacks it: the local files are the record
        log.warning("logger=wandb but the wandb package is not installed; training without W&B "
                    "(pip install wandb, or pass logger=none)")
        return NullLogger()

    os.environ.setdefault("WANDB_SILENT", "true")
    wandb_dir = Path(run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(project=cfg_logger.project, entity=cfg_logger.entity, dir=str(wandb_dir), name=name,
                  group=group, job_type=job_type, tags=tags, config=config, id=run_id, resume="allow",
                  reinit="create_new")

    def init(m: str):
        settings = wandb.Settings(init_timeout=float(cfg_logger.init_timeout), console="off",
                                  silent=True, x_disable_stats=True)
        return wandb.init(mode=m, settings=settings, **kwargs)

    if mode == "online":
        try:
            run = init("online")
            log.info("W&B online (%s): %s", reason, run.url)
            return WandbLogger(run)
        except Exception as exc:  # no network, bad key, timeout: keep training, log offline
            log.warning("W&B online init failed (%s: %s); falling back to offline mode", type(exc).__name__, exc)
            reason = "online init failed"
    run = init("offline")
    offline_dir = Path(run.dir).parent
    asked = os.environ.get("WANDB_MODE") or cfg_logger.mode
    say = log.warning if asked in ("online", "run") else log.info  # online was asked for and not had
    say("W&B offline (%s). Upload later with: wandb sync %s", reason, offline_dir)
    return WandbLogger(run)
