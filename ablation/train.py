"""Train one VAE run, or a sweep of them, from the Hydra config in conf/.

    python -m ablation.train                                   # one run, all regularizers off
    python -m ablation.train -m regularizer=none,all           # the 2-run study (`make run`)
    python -m ablation.train -m regularizer=none,all seed=0,1,2
    python -m ablation.train -m +sweep=factorial               # all 32 combinations
    python -m ablation.train dropout=on beta=on budget=smoke   # any single combination
    python -m ablation.train -m regularizer=none,all hydra/launcher=joblib hydra.launcher.n_jobs=2
    python -m ablation.train --cfg job regularizer=all         # print the composed config
    python -m ablation.train --help                            # commands, groups and the config

Each run writes results/<study>/<regularizers>_seed<N>/ (see ablation/rundir.py). Rerunning a
command skips completed runs and resumes interrupted ones from their last epoch checkpoint.
Ctrl-C (SIGINT) or SIGTERM stops a run with one line, exit code 130 (143 for SIGTERM), and its
status "interrupted"; the checkpoint is kept, and rerunning the command resumes it.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from . import config as C
from . import provenance
from . import regularizers as R
from . import wandb_logger
from .data import DIGEST_FIELD, DataError, load_images, subset
from .rundir import RunDir, RunLockedError, State, detach_logs
from .runio import (atomic_torch_save, atomic_write_text, check_free_space, describe_os_error, device_slot,
                    remove_stale_temps)
from .runtime import Runtime, activate, prepare
from .sample_quality import check_inception_weights
from .trainer import DeadlineReached, Diverged, build_trainer, seed_everything

log = logging.getLogger("ablation.train")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM sends before it kills a job), raised like Ctrl-C's KeyboardInterrupt."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM, recorded "interrupted" with its checkpoint kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _raise_terminated(signum, frame):
    raise Terminated()


def _exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process ended by it: 130 (SIGINT), 143 (SIGTERM)."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def train(cfg: DictConfig) -> dict:
    """Train the run a composed config describes, unless it is already done; return its metrics.json."""
    job = HydraConfig.get() if HydraConfig.initialized() else None
    runtime, budget = prepare(cfg, int(job.job.get("num", 0) or 0) if job else 0, job.get("launcher") if job else None)
    run = RunDir(job.runtime.output_dir if job else Path(cfg.results_dir) / cfg.study / cfg.run_name)
    name = run.name
    chash = C.config_hash(cfg)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(run.lock())
        except RunLockedError as exc:
            detach_logs(run.path)  # this process's log lines stay out of the holder's train.log
            if job is None or job.mode.name != "MULTIRUN":
                raise
            log.warning("%s: skipped: %s", name, exc)  # a sweep goes on with its free runs
            return {"status": "locked", "run_name": name, "study": cfg.study, "error": str(exc)}
        for folder in (run.path, Path(cfg.data.cache_dir).expanduser()):
            for tmp in remove_stale_temps(folder) if folder.is_dir() else []:
                log.info("removed %s, left by a write that was killed", tmp)
        state = run.state(chash, cfg.overwrite, cfg)
        if state.final:
            log.info("%s: skipped (%s, config hash %s)%s", name, state.value, chash,
                     "; delete its directory to train it again" if state is State.DIVERGED else "")
            return run.metrics()
        expected = _expected_seconds(run, C.settings_hash(cfg), cfg.trainer.epochs)
        if cfg.trainer.deadline is not None and expected is not None and time.time() + expected > cfg.trainer.deadline:
            log.info("%s: not started: its study's finished runs took up to %.0f s, which would end after the "
                     "deadline; rerun later to train it", name, expected)
            return {"status": "not started", "run_name": name, "study": cfg.study}
        with gpu_slot(cfg.trainer.device, runtime.device) as device:
            return _run(cfg, run, replace(runtime, device=device), budget, chash, resume=state is State.INTERRUPTED)


@contextlib.contextmanager
def gpu_slot(requested: str, device: torch.device):
    """With trainer.device=auto and several GPUs, the GPU this run holds while it trains.

    Parallel jobs (joblib) start as others finish, so job k's GPU k mod n may still be busy
    with an earlier job; the run takes the first free GPU from there instead (device_slot).
    """
    if requested != "auto" or device.type != "cuda" or torch.cuda.device_count() < 2:
        yield device
        return
    with device_slot(torch.cuda.device_count(), device.index or 0) as k:
        if k is None:
            log.warning("every GPU is busy with another run of this machine; sharing cuda:%d", device.index)
        yield device if k is None else torch.device("cuda", k)


def _expected_seconds(run: RunDir, settings_hash: str, epochs: int) -> float | None:
    """How long this run should take, from the finished runs of its study with the same settings:
    the longest of their wall times, scaled to the epochs this run has left; None without any."""
    times = []
    for path in run.path.parent.glob("*/metrics.json"):
        other = RunDir(path.parent).metrics() or {}
        if other.get("status") == "completed" and \
                C.current_settings_hash(path.parent / "config.yaml", other.get("settings_hash")) == settings_hash:
            times.append(float(other.get("wall_time_s") or 0) / max(1, int(other.get("epochs_completed") or 1)))
    if not times:
        return None
    done = int((run.metrics() or {}).get("epochs_completed") or 0)
    return max(times) * max(0, epochs - done)


def _load_data(cfg: DictConfig, device: torch.device):
    """The run's images on its device; a bad data root is a user error (one message, exit 2)."""
    data = load_images(cfg.data.root, cfg.data.download, cfg.data.cache_dir)
    data = subset(data, cfg.data.train_size, cfg.data.test_size, cfg.data.subset_seed).to(device)
    height, width = data.train_x.shape[-2:]
    if height != width or height % 8:
        raise DataError(f"the images in data.root '{cfg.data.root}' are {height}x{width} pixels; the VAE needs "
                        f"square images whose side is a multiple of 8 (three stride-2 stages). Resize them, "
                        f"e.g. to 32x32 as CIFAR-10.")
    return data


def _run(cfg: DictConfig, run: RunDir, runtime: Runtime, budget: str, chash: str, resume: bool) -> dict:
    name = run.name
    activate(runtime)
    log.info("%s on %s (%d threads), budget %s", name, runtime.device, torch.get_num_threads(), budget)
    seed_everything(cfg.seed)
    if cfg.eval.inception_weights is not None:  # a bad path fails now, not after training
        check_inception_weights(cfg.eval.inception_weights)
    data = _load_data(cfg, runtime.device)  # before any run file is written
    before = (run.metrics() or {}) if resume else {}  # the record of the attempt this one resumes
    started_on = before.get(DIGEST_FIELD)
    if started_on and data.identity is not None and started_on != data.identity.digest:
        raise DataError(f"{run.path} started training on data {started_on[:12]}, but data.root '{cfg.data.root}' "
                        f"now holds data {data.identity.digest[:12]}; point data.root back at the data it started on, "
                        f"or pass overwrite=true to train it again from the start")
    # A resumed run keeps the W&B run id it started with, even where today's config_hash of its config differs
    # from the hash it was started under (the id names that hash).
    wandb_id = before.get("wandb_id") or \
        wandb_logger.safe_name(cfg.study, name, (before.get("config_hash") or chash)[:8])
    atomic_write_text(run / "config.yaml", OmegaConf.to_yaml(cfg))
    flags = R.flags(cfg)
    origin = provenance.collect(runtime.device)
    run.start({"study": cfg.study, "run_name": name, "seed": cfg.seed, "config_hash": chash,
               "settings_hash": C.settings_hash(cfg), "budget": budget, "device": str(runtime.device),
               "threads": runtime.threads, "precision": runtime.precision, **data.identity.fields(),
               **{f"reg_{k}": v for k, v in flags.items()}, "provenance": origin, "wandb_id": wandb_id},
              resume=resume)
    # The resolved config with the regularizers' effective values, plus their switches as top-level
    # booleans to group and filter by in W&B; run_name is the run's (directory's) name, as in metrics.json.
    wb_config = (OmegaConf.to_container(cfg, resolve=True) | R.effective_dict(cfg)
                 | {f"reg_{k}": v for k, v in flags.items()} | {"provenance": origin, "run_name": name})
    exit_code, trainer = 1, None
    logger = wandb_logger.NullLogger()  # until W&B has started: a failure to start it fails the run
    try:
        logger = wandb_logger.start(cfg.logger, run_dir=run.path, name=name, group=cfg.study,
                                    job_type="train", config=wb_config,
                                    tags=([r for r, on in flags.items() if on] or ["none"]) + list(cfg.logger.tags),
                                    run_id=wandb_id)
        trainer = build_trainer(cfg, data, runtime, run.path, logger, config_hash=chash)
        check_free_space(run.path, _bytes_needed(trainer.model))
        if resume:
            # On the CPU: RNG states must stay there; load_state_dict moves the rest to the device.
            trainer.load_state_dict(torch.load(run.checkpoint, map_location="cpu", weights_only=False))
            log.info("%s: resumed from checkpoint after epoch %d", name, trainer.epoch)
            logger.resend_history(trainer.epoch_rows + trainer.step_rows)
        trainer.fit()
        metrics = _finish(cfg, run, trainer, logger)
        exit_code = 0
        return metrics
    except DeadlineReached as exc:
        log.warning("%s: %s; rerun the same command to resume", name, exc)
        metrics = run.record("interrupted", epochs_completed=exc.epoch, steps=trainer.step, error=str(exc),
                             wall_time_s=run.wall_time())
        logger.summary(metrics)
        return metrics  # the sweep goes on: its next runs see the deadline before they start
    except Diverged as exc:
        log.error("%s: diverged: %s", name, exc)
        if trainer is not None:
            trainer.step_rows.append({"kind": "diverged", "epoch": exc.epoch, "step": exc.step})
            trainer.write_history()
        metrics = run.record("diverged", diverged_epoch=exc.epoch, diverged_step=exc.step, error=str(exc),
                             wall_time_s=run.wall_time())
        run.checkpoint.unlink(missing_ok=True)
        logger.summary(metrics)
        return metrics  # a diverged run is a result: the sweep goes on
    except KeyboardInterrupt as exc:
        epoch = _checkpoint_epoch(run)
        message = (f"{name}: interrupted after epoch {epoch}; rerun the same command to resume"
                   if epoch else f"{name}: interrupted before its first checkpoint; rerun the same "
                                 f"command to start it again")
        metrics = run.record("interrupted", epochs_completed=epoch, error=message, wall_time_s=run.wall_time())
        logger.summary(metrics)
        raise Interrupted(message, _exit_code(exc)) from None
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):  # on a full disk the record fails too: the error is reported anyway
            run.record("failed", error=error, traceback=traceback.format_exc(limit=5), wall_time_s=run.wall_time())
        logger.summary({"status": "failed", "error": error})
        raise
    finally:
        logger.finish(exit_code=exit_code)


def _checkpoint_epoch(run: RunDir) -> int:
    """The epoch a rerun resumes after: the checkpoint's, 0 without one."""
    if not run.checkpoint.exists():
        return 0
    return int(torch.load(run.checkpoint, map_location="cpu", weights_only=False)["epoch"])


def _bytes_needed(model: torch.nn.Module) -> int:
    """A run's disk use at its peak: model.pt, and the checkpoint (model and two Adam moments) twice while
    its next one replaces it, plus 64 MiB for history, image grids and W&B files."""
    return 7 * sum(p.numel() * p.element_size() for p in model.parameters()) + 64 * 2**20


def _finish(cfg: DictConfig, run: RunDir, trainer, logger) -> dict:
    """Final metrics, samples and model of a trained run; records it completed."""
    name = run.name
    final = trainer.final()
    trainer.save_samples(run / "samples.png")
    shutil.copyfile(run / f"recon_epoch{trainer.epoch:03d}.png", run / "recon_final.png")
    atomic_torch_save(trainer.model.state_dict(), run / "model.pt")
    epochs = trainer.epoch_rows
    metrics = run.record(
        "completed", **final, epochs_completed=trainer.epoch, steps=trainer.step,
        max_gen_gap=max(r["gen_gap"] for r in epochs), best_epoch=min(epochs, key=lambda r: r["test_recon"])["epoch"],
        images_per_s=len(trainer.data.train_x) * trainer.epoch / max(trainer.train_time, 1e-9),
        train_time_s=trainer.train_time, wall_time_s=run.wall_time())
    run.checkpoint.unlink(missing_ok=True)
    logger.log_images({"recon_final": run / "recon_final.png", "samples": run / "samples.png"}, step=trainer.step)
    logger.summary(metrics)
    if cfg.logger.get("log_model"):
        logger.log_artifact(run / "model.pt", name=wandb_logger.safe_name("model", cfg.study, name),
                            kind="model")
    log.info("%s: completed  test recon %.2f  kl %.2f  psnr %.2f dB  (%.0f s)", name,
             metrics["test_recon"], metrics["test_kl"], metrics["psnr"], metrics["wall_time_s"])
    return metrics


def check_overrides(args: list[str]) -> None:
    """Refuse a command-line key outside the schema, with `+` or without, before Hydra composes:
    ConfigError naming the key and the closest valid one. Config groups (`+sweep=factorial`,
    `dropout=on`) and hydra's own keys pass; Hydra reports what it cannot parse."""
    parsed_args = get_args_parser().parse_known_args(args)[0]
    if parsed_args.shell_completion:  # its "overrides" are the completion's command (install=bash)
        return
    try:
        parsed = OverridesParser.create().parse_overrides(parsed_args.overrides)
    except Exception:  # Hydra's own message follows at composition
        return
    valid = C.schema_keys()
    dirs = [Path(d) for d in (C.CONF_DIR, parsed_args.config_path, parsed_args.config_dir) if d]
    groups = {p.relative_to(d).as_posix() for d in dirs if d.is_dir() for p in d.rglob("*") if p.is_dir()}
    for override in parsed:
        key = override.key_or_group
        if key.split(".", 1)[0].split("/", 1)[0] == "hydra" or key in groups or key in valid:
            continue
        raise C.unknown_key_error(key, valid)


@hydra.main(config_path=str(C.CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict:
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return train(cfg)
    except (C.ConfigError, RunLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a full disk, a read-only folder, no permission: one line naming the path and fix
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        print("interrupted before training started; rerun the same command", file=sys.stderr)
        sys.exit(_exit_code(exc))


def main() -> None:
    """The command line: checks the keys it is given, then lets Hydra compose and run."""
    try:
        check_overrides(sys.argv[1:])
    except C.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    # Call `main` through its importable name, so that process launchers (joblib, submitit)
    # pickle it by reference to `ablation.train` rather than by value from `__main__`.
    from ablation.train import main as _main

    _main()
