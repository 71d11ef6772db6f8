"""Train one VAE run, or a sweep of them, from the Hydra config in conf/.

    python -m ablation.train                                   # one run, all regularizers off
    python -m ablation.train -m regularizer=none,all           # the 2-run study (`make run`)
    python -m ablation.train -m regularizer=none,all seed=0,1,2
    python -m ablation.train -m +sweep=factorial               # all 32 combinations
    python -m ablation.train dropout=on beta=on budget=smoke   # any single combination
    python -m ablation.train -m regularizer=none,all hydra/launcher=joblib hydra.launcher.n_jobs=2
    python -m ablation.train --cfg job regularizer=all         # print the composed config

Each run writes results/<study>/<regularizers>_seed<N>/: config.yaml, history.csv,
metrics.json, model.pt and PNG grids. Rerunning a command skips completed runs and resumes
interrupted ones from their last epoch checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import config as C
from .allocator import reuse_freed_memory
from .data import DataError, load_images, subset
from .model import build_model
from .runio import (RunLockedError, atomic_torch_save, atomic_write_json, atomic_write_text, device_slot, read_json,
                    run_lock)
from .trainer import Diverged, RunSettings, Trainer, seed_everything

log = logging.getLogger("ablation.train")

# Files a run writes; `overwrite=true` removes them before starting again.
RUN_OUTPUTS = ("metrics.json", "history.csv", "checkpoint.pt", "model.pt", "config.yaml", "samples.png",
               "recon_final.png")


def _hydra_job() -> tuple[Path | None, int, DictConfig | None]:
    """(output dir, job number, launcher config) when running under Hydra."""
    if not HydraConfig.initialized():
        return None, 0, None
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), int(hc.job.get("num", 0) or 0), hc.get("launcher")


def choose_device(requested: str, job_num: int) -> torch.device:
    """auto: CUDA when available (job k of a parallel sweep prefers GPU k mod n; see gpu_slot), else CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", job_num % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise C.ConfigError(f"trainer.device={requested!r} is not a device; use trainer.device=auto, cpu, cuda "
                            f"or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise C.ConfigError(f"trainer.device={requested} is not supported; use trainer.device=auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise C.ConfigError(f"trainer.device={requested} but CUDA is not available here; use trainer.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise C.ConfigError(f"trainer.device={requested} but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of those or auto")
    return device


def choose_threads(requested: int, launcher: DictConfig | None) -> int:
    """trainer.threads, or cores / parallel jobs: a joblib sweep of n jobs gives each cores // n."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if launcher is not None:
        if launcher.get("cpus_per_task"):
            return max(1, min(cores, int(launcher.cpus_per_task)))
        n_jobs = int(launcher.get("n_jobs") or 1)
        if n_jobs < 0:  # joblib: -1 = all cores, one job each
            n_jobs = cores
        return max(1, cores // max(1, n_jobs))
    return cores


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), with which oneDNN's bf16
    convolutions beat fp32; without them it emulates bf16, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's cpuinfo checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(requested: str, device: torch.device, native_bf16: bool | None = None) -> str:
    """'fp32' or 'bf16' for trainer.precision on `device`; refuses bf16 where it is not native.

    auto is bf16 on a CUDA GPU with bf16 support and fp32 everywhere else, the CPU included even
    where it has bf16 instructions: the CPU study's figures were computed in fp32, and a run
    that resumes must not change precision. `native_bf16` overrides the CPU probe (tests).
    """
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise C.ConfigError(f"trainer.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 "
                                f"support; use trainer.precision=fp32")
        return "bf16"
    if cpu_has_native_bf16() if native_bf16 is None else native_bf16:
        return "bf16"
    raise C.ConfigError("trainer.precision=bf16 needs bf16 instructions (AVX512-BF16 or AMX), which this CPU "
                        "lacks: bf16 would be emulated, slower than fp32; use trainer.precision=fp32 (or auto)")


def choose_precision(requested: str, device: torch.device):
    """An autocast context factory for bf16, or None for fp32."""
    if resolve_precision(requested, device) == "fp32":
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _existing_state(run_dir: Path, chash: str, overwrite: bool) -> str:
    """'completed', 'diverged', 'resume' or 'fresh' for this config in `run_dir`; refuses a foreign directory."""
    metrics = read_json(run_dir / "metrics.json")
    ckpt = run_dir / "checkpoint.pt"
    old = metrics.get("config_hash") if metrics else None
    if old is None and ckpt.exists():
        try:
            old = torch.load(ckpt, map_location="cpu", weights_only=False).get("config_hash")
        except Exception:
            old = None
    if old is not None and old != chash:
        if not overwrite:
            raise C.ConfigError(
                f"run directory {run_dir} holds a run with a different config (hash {old}, this config "
                f"{chash}). Use another study=NAME, or pass overwrite=true to replace it.")
        log.warning("overwrite=true: replacing the run in %s (config hash %s -> %s)", run_dir, old, chash)
        for name in RUN_OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        for png in run_dir.glob("recon_epoch*.png"):
            png.unlink()
        shutil.rmtree(run_dir / "wandb", ignore_errors=True)
        return "fresh"
    if metrics and metrics.get("status") in ("completed", "diverged") and old == chash:
        return metrics["status"]  # both are results; a diverged run would diverge again (on the CPU, exactly)
    return "resume" if ckpt.exists() else "fresh"


def prepare(cfg: DictConfig) -> tuple[torch.device, str]:
    """Resolve the auto budget, check ranges, choose the device and set up the allocator; before any
    data is touched."""
    _, job_num, _ = _hydra_job()
    device = choose_device(cfg.trainer.device, job_num)
    requested = cfg.budget.name
    budget = C.resolve_budget(cfg, cuda=device.type == "cuda")
    if requested == "auto":
        log.info("budget=auto chose budget=%s (%s)", budget, "CUDA found" if device.type == "cuda" else "no CUDA")
    C.validate(cfg)
    OmegaConf.resolve(cfg)
    choose_precision(cfg.trainer.precision, device)
    if cfg.trainer.reuse_memory:
        reuse_freed_memory()
    if cfg.trainer.compile and device.type != "cuda":
        raise C.ConfigError("trainer.compile=true is supported on CUDA only (inductor on the CPU needs a C++ "
                            "toolchain and minutes of compilation for no gain at these sizes); use trainer.compile=false")
    return device, budget


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move the model to `device` in channels_last layout: faster convolutions on CUDA (cuDNN)
    and on the CPU (oneDNN: +14% per width-32 training step on the development machine)."""
    return model.to(device=device, memory_format=torch.channels_last)


def build_trainer(cfg: DictConfig, data, device: torch.device, run_dir: Path, logger,
                  config_hash: str | None = None) -> Trainer:
    """The seeded model (channels_last and optionally compiled on CUDA) and its Trainer.

    `data` is an ImageData already on `device`; `config_hash` is the config's, when the caller has
    it already. The benchmark builds its suite loop here too.
    """
    seed_everything(cfg.seed)
    model = place_model(build_model(cfg, data.image_size, data.channels), device)
    step_model = torch.compile(model) if cfg.trainer.compile else model
    settings = RunSettings.from_cfg(cfg)
    settings.log_interval = C.step_row_interval(cfg)
    return Trainer(model, data, settings, run_dir, logger, choose_precision(cfg.trainer.precision, device),
                   step_model, config_hash=config_hash or C.config_hash(cfg))


def train(cfg: DictConfig) -> dict:
    """Train one run described by a composed config; return its metrics.json content."""
    device, budget = prepare(cfg)
    run_dir, _, launcher = _hydra_job()
    run_dir = run_dir or Path(cfg.results_dir) / cfg.study / cfg.run_name
    chash, shash = C.config_hash(cfg), C.settings_hash(cfg)
    flags = C.flags(cfg)
    with run_lock(run_dir):
        state = _existing_state(run_dir, chash, cfg.overwrite)
        if state in ("completed", "diverged"):
            log.info("%s: skipped (%s, config hash %s)%s", cfg.run_name, state, chash,
                     "; delete its directory to train it again" if state == "diverged" else "")
            return read_json(run_dir / "metrics.json")
        with gpu_slot(cfg.trainer.device, device) as device:
            return _run(cfg, run_dir, device, budget, chash, shash, flags, launcher, resume=state == "resume")


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


def _run(cfg, run_dir: Path, device, budget: str, chash: str, shash: str, flags: dict, launcher,
         resume: bool) -> dict:
    from . import wandb_logger

    threads = choose_threads(cfg.trainer.threads, launcher)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log.info("%s on %s (%d threads), budget %s", cfg.run_name, device, torch.get_num_threads(), budget)
    seed_everything(cfg.seed)
    # Data first: a bad data root is a user error (one message, exit 2) and leaves no run files behind.
    data = load_images(cfg.data.root, cfg.data.download, cfg.data.cache_dir)
    data = subset(data, cfg.data.train_size, cfg.data.test_size, cfg.data.subset_seed).to(device)
    height, width = data.train_x.shape[-2:]
    if height != width or height % 8:
        raise DataError(f"the images in data.root '{cfg.data.root}' are {height}x{width} pixels; the VAE needs "
                        f"square images whose side is a multiple of 8 (three stride-2 stages). Resize them, "
                        f"e.g. to 32x32 as CIFAR-10.")
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    base = {"status": "running", "study": cfg.study, "run_name": cfg.run_name, "seed": cfg.seed,
            "config_hash": chash, "settings_hash": shash, "budget": budget, "device": str(device),
            "threads": threads, "precision": resolve_precision(cfg.trainer.precision, device),
            **{f"reg_{k}": v for k, v in flags.items()}}
    atomic_write_json(run_dir / "metrics.json", base)

    wall_start = time.perf_counter()
    tags = [r for r, on in flags.items() if on] or ["none"]
    # The resolved config, plus the five switches as top-level booleans to group and filter by in W&B.
    wb_config = OmegaConf.to_container(cfg, resolve=True) | {f"reg_{k}": v for k, v in flags.items()}
    exit_code = 1
    trainer = None
    logger = wandb_logger.NullLogger()  # until W&B has started: a failure to start it fails the run
    try:
        logger = wandb_logger.start(cfg.logger, run_dir=run_dir, name=cfg.run_name, group=cfg.study,
                                    job_type="train", tags=tags + list(cfg.logger.tags), config=wb_config,
                                    run_id=f"{cfg.study.replace('/', '-')}-{cfg.run_name}-{chash[:8]}")
        trainer = build_trainer(cfg, data, device, run_dir, logger, config_hash=chash)
        model = trainer.model
        if resume:
            # On the CPU: RNG states must stay there; load_state_dict moves the rest to the device.
            ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
            trainer.load_state_dict(ckpt)
            log.info("%s: resumed from checkpoint after epoch %d", cfg.run_name, trainer.epoch)
        trainer.fit()
        final = trainer.final()
        trainer.save_samples(run_dir / "samples.png")
        shutil.copyfile(run_dir / f"recon_epoch{trainer.epoch:03d}.png", run_dir / "recon_final.png")
        atomic_torch_save(model.state_dict(), run_dir / "model.pt")
        epochs = trainer.epoch_rows
        best = min(epochs, key=lambda r: r["test_recon"])
        metrics = base | final | {
            "status": "completed", "epochs_completed": trainer.epoch, "steps": trainer.step,
            "max_gen_gap": max(r["gen_gap"] for r in epochs), "best_epoch": best["epoch"],
            "images_per_s": len(data.train_x) * trainer.epoch / max(trainer.train_time, 1e-9),
            "train_time_s": trainer.train_time, "wall_time_s": time.perf_counter() - wall_start,
        }
        atomic_write_json(run_dir / "metrics.json", metrics)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        logger.log_images({"recon_final": run_dir / "recon_final.png", "samples": run_dir / "samples.png"},
                          step=trainer.step)
        logger.summary(metrics)
        if cfg.logger.get("log_model"):
            logger.log_artifact(run_dir / "model.pt", name=f"model-{cfg.run_name}", kind="model")
        exit_code = 0
        log.info("%s: completed  test recon %.2f  kl %.2f  psnr %.2f dB  (%.0f s)", cfg.run_name,
                 metrics["test_recon"], metrics["test_kl"], metrics["psnr"], metrics["wall_time_s"])
        return metrics
    except Diverged as exc:
        log.error("%s: diverged: %s", cfg.run_name, exc)
        if trainer is not None:
            trainer.step_rows.append({"kind": "diverged", "epoch": exc.epoch, "step": exc.step})
            trainer.write_history()
        metrics = base | {"status": "diverged", "diverged_epoch": exc.epoch, "diverged_step": exc.step,
                          "error": str(exc), "wall_time_s": time.perf_counter() - wall_start}
        atomic_write_json(run_dir / "metrics.json", metrics)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        logger.summary(metrics)
        return metrics  # a diverged run is a result: the sweep goes on
    except BaseException as exc:
        metrics = base | {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(limit=5), "wall_time_s": time.perf_counter() - wall_start}
        atomic_write_json(run_dir / "metrics.json", metrics)
        logger.summary({"status": "failed", "error": metrics["error"]})
        raise
    finally:
        logger.finish(exit_code=exit_code)


@hydra.main(config_path=str(C.CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        return train(cfg)
    except (C.ConfigError, RunLockedError) as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Call `main` through its importable name, so that process launchers (joblib, submitit)
    # pickle it by reference to `ablation.train` rather than by value from `__main__`.
    from ablation.train import main as _main

    _main()
