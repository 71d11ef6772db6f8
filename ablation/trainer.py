"""The training loop: epochs of Adam steps, per-epoch evaluation, grids, history and checkpoints.

The step keeps everything on the device: loss parts and the non-finite check are
accumulated in tensors and read back only every `log_interval` steps and at the end of an
epoch, so a GPU step never waits for the host. Checkpoints hold everything a resumed run
needs to continue bit for bit on the CPU: model, optimizer, batch generator, RNG states,
epoch, step, history and elapsed time.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.utils import save_image

from .classifier import load_or_train
from .config import EvalConfig, TrainerConfig, config_hash as hash_config, step_row_interval
from .data import ImageData, TrainBatches, split_validation, stratified_indices, to_unit_range
from .evaluate import evaluate, final_metrics, inference_copy
from .model import build_model
from .objective import vae_loss
from .progress import EpochProgress
from .regularizers import effective
from .runio import atomic_torch_save, atomic_write
from .runtime import Runtime, place_model

log = logging.getLogger(__name__)

GRID_CLASSES = 10  # classes in each reconstruction grid: the first test image of each, in class order
SAMPLE_IMAGES = 64  # prior samples in samples.png


class DeadlineReached(RuntimeError):
    """The next epoch would end after trainer.deadline: the run stopped with a checkpoint."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"stopped after epoch {epoch}: the next epoch would end after the deadline")
        self.epoch = epoch


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm; the run stops with status 'diverged'."""

    def __init__(self, epoch: int, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.what = epoch, step, what


@dataclass
class RunSettings:
    """What the loop needs from the resolved config, flattened, with the regularizers' effective values."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    beta: float
    flip: bool
    crop_padding: int
    seed: int
    subset_seed: int
    log_interval: int
    image_interval: int
    wandb_image_interval: int
    checkpoint: bool
    val_size: int | None = None  # validation images carved from the training set; None = no split
    checkpoint_every_s: float = 0.0  # least seconds between checkpoints; 0 = every epoch
    progress_every_s: float = TrainerConfig.progress_every_s  # stderr progress (ablation/progress.py); 0 = none
    deadline: float | None = None  # Unix time by which the run stops between epochs
    iw_samples: int = EvalConfig.iw_samples  # the end-of-run measures' eval.* settings
    iw_images: int | None = EvalConfig.iw_images
    sample_images: int = EvalConfig.sample_images
    classifier_epochs: int = EvalConfig.classifier_epochs
    inception_weights: str | None = None
    pad_mode: str = "zeros"  # augmentation's crop padding: zeros | reflect
    cache_dir: str | None = None  # where the suite classifier is cached (data.cache_dir); None = not measured

    @classmethod
    def from_cfg(cls, cfg) -> "RunSettings":
        reg = effective(cfg)
        return cls(
            epochs=cfg.trainer.epochs, batch_size=cfg.trainer.batch_size,
            eval_batch_size=cfg.trainer.eval_batch_size, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            weight_decay=reg.weight_decay.value, beta=reg.beta.value, flip=reg.augmentation.flip,
            crop_padding=reg.augmentation.crop_padding, pad_mode=reg.augmentation.pad_mode, seed=cfg.seed, subset_seed=cfg.data.subset_seed,
            log_interval=step_row_interval(cfg), image_interval=cfg.trainer.image_interval,
            wandb_image_interval=cfg.logger.image_interval if cfg.logger.backend == "wandb" else 0,
            checkpoint=cfg.trainer.checkpoint, val_size=cfg.data.val_size,
            checkpoint_every_s=cfg.trainer.checkpoint_every_s, deadline=cfg.trainer.deadline,
            progress_every_s=cfg.trainer.progress_every_s,
            iw_samples=cfg.eval.iw_samples, iw_images=cfg.eval.iw_images, sample_images=cfg.eval.sample_images,
            classifier_epochs=cfg.eval.classifier_epochs, inception_weights=cfg.eval.inception_weights,
            cache_dir=cfg.data.cache_dir)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, s: RunSettings) -> torch.optim.Adam:
    """Adam with the run's L2 weight decay (added to the gradient, as in torch's Adam).

    The fused implementation (one kernel per parameter, the same update) where torch has one
    for the parameters' device: about 5% of the width-32 CPU step, whose Adam update was a
    few dozen small ops per parameter.
    """
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, fused=fused or None)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, model: torch.nn.Module, data: ImageData, settings: RunSettings, run_dir: Path,
                 logger, autocast=None, step_model: torch.nn.Module | None = None,
                 config_hash: str | None = None) -> None:
        self.model = model
        # The validation images leave the training set before anything else draws from it, so the batches
        # and the train subset below come from the remaining images; with no split, `data` is unchanged.
        # Which images are held out is fixed by subset_seed alone (+3: the subsets use +0, +1 and +2).
        data, self.val_x, self.val_y = split_validation(data, settings.val_size, settings.subset_seed + 3)
        self.config_hash = config_hash  # stored in the checkpoint: a resume checks it
        self.step_model = step_model or model  # a torch.compile'd view of `model`, or the model
        self.data = data
        self.s = settings
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.autocast = autocast
        self.optimizer = make_optimizer(model, settings)
        self.batches = TrainBatches(data.train_x, settings.batch_size, settings.flip, settings.crop_padding,
                                    seed=settings.seed, pad_mode=settings.pad_mode)
        sub = stratified_indices(data.train_y, data.test_x.shape[0], settings.subset_seed + 2)
        self.trainsub_x, self.trainsub_y = data.train_x[sub.to(data.train_x.device)], data.train_y[sub.to(data.train_y.device)]
        self.grid_x = data.test_x[first_of_each_class(data.test_y, GRID_CLASSES).to(data.test_x.device)]
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.train_time = 0.0  # seconds spent in training steps
        self.epoch_rows: list[dict] = []
        self.step_rows: list[dict] = []
        # the train loss parts summed over the images since the last step row, and the number of
        # images and steps in that window; kept across epochs, so every row averages log_interval steps
        self.window = torch.zeros(3, dtype=torch.float64, device=data.train_x.device)
        self.window_images = 0
        self.window_steps = 0
        self._last_eval: tuple[int, dict, dict] | None = None  # (epoch, test, trainsub) of the last epoch

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {"config_hash": self.config_hash, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "batches": self.batches.generator.get_state(),
                "rng": _rng_state(), "epoch": self.epoch, "step": self.step, "train_time": self.train_time,
                "epoch_rows": self.epoch_rows, "step_rows": self.step_rows,
                "window": self.window.detach().cpu().clone(), "window_images": self.window_images,
                "window_steps": self.window_steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.generator.set_state(state["batches"])
        _set_rng_state(state["rng"])
        self.epoch, self.step, self.train_time = state["epoch"], state["step"], state["train_time"]
        self.epoch_rows, self.step_rows = list(state["epoch_rows"]), list(state["step_rows"])
        self.window.copy_(state["window"])
        self.window_images, self.window_steps = state["window_images"], state["window_steps"]

    # ------------------------------------------------------------------ the loop

    def _ctx(self):
        return self.autocast() if self.autocast else contextlib.nullcontext()

    def train_epoch(self) -> dict:
        """One pass over the training set; returns the epoch's mean train loss parts."""
        model, opt, s = self.step_model, self.optimizer, self.s
        self.model.train()
        epoch = self.epoch + 1
        device = self.data.train_x.device
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss, recon, kl summed over images
        bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
        step_t = torch.full((), self.step, dtype=torch.long, device=device)  # the step count, on the device
        seen = 0
        progress = EpochProgress(self.run_dir.name, epoch, s.epochs, self.batches.images.shape[0], s.progress_every_s)
        start = time.perf_counter()
        for x in self.batches:
            self.step += 1
            n = x.shape[0]
            with self._ctx():
                out = model(x)
            parts = vae_loss(out.recon, x, out.mu, out.logvar, s.beta)
            loss = parts.total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            log_now = self.step % s.log_interval == 0
            grad_norm = None
            if log_now:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            opt.step()
            parts_t = torch.stack([loss.detach(), parts.recon.detach(), parts.kl.detach()]).double() * n
            totals += parts_t
            self.window += parts_t
            self.window_images += n
            self.window_steps += 1
            seen += n
            progress.update(n)
            step_t += 1
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step_t, bad_step)
            if log_now:
                self._step_row(epoch, self.window / self.window_images, grad_norm, bad_step)
                self.window.zero_()
                self.window_images = self.window_steps = 0
        elapsed = time.perf_counter() - start
        progress.close()
        self.train_time += elapsed
        self._check_finite(epoch, bad_step)
        mean = (totals / seen).tolist()
        return {"train_loss": mean[0], "train_recon": mean[1], "train_kl": mean[2],
                "images_per_s": seen / elapsed, "epoch_time_s": elapsed}

    def _check_finite(self, epoch: int, bad_step: torch.Tensor, grad_norm: float | None = None) -> None:
        step = int(bad_step)
        if step >= 0:
            raise Diverged(epoch, step, "loss")
        if grad_norm is not None and not np.isfinite(grad_norm):
            raise Diverged(epoch, self.step, "gradient norm")

    def _step_row(self, epoch: int, means: torch.Tensor, grad_norm: torch.Tensor, bad_step: torch.Tensor) -> None:
        loss, recon, kl = means.tolist()  # the one host sync every log_interval steps
        gn = float(grad_norm)
        row = {"kind": "step", "epoch": epoch, "step": self.step, "train_loss": loss, "train_recon": recon,
               "train_kl": kl, "grad_norm": gn, "window_steps": self.window_steps}
        self.step_rows.append(row)
        self.logger.log({"train/loss": loss, "train/recon": recon, "train/kl": kl, "train/grad_norm": gn,
                         "epoch": epoch}, step=self.step)
        self._check_finite(epoch, bad_step, gn)

    def fit(self) -> None:
        """Train from the current epoch to the last, evaluating after each; checkpoint when
        checkpoint_every_s have passed, and stop with one (DeadlineReached) when another epoch would
        end after the deadline."""
        s = self.s
        last_checkpoint = time.monotonic()
        while self.epoch < s.epochs:
            epoch_start = time.monotonic()
            row = self.train_epoch()
            self.epoch += 1
            last = self.epoch == s.epochs  # the last epoch keeps the latent means for final()
            folded = inference_copy(self.model)  # one eval-mode copy with batch norm folded, for both sets
            test = evaluate(folded, self.data.test_x, s.beta, s.eval_batch_size, self.autocast, keep_mu=last,
                            folded=True)
            train = evaluate(folded, self.trainsub_x, s.beta, s.eval_batch_size, self.autocast, keep_mu=last,
                             folded=True)
            val = (evaluate(folded, self.val_x, s.beta, s.eval_batch_size, self.autocast, folded=True)
                   if self.val_x is not None else None)
            del folded
            self._last_eval = (self.epoch, test, train) if last else None
            row = {"kind": "epoch", "epoch": self.epoch, "step": self.step, **row,
                   "test_recon": test["recon"], "test_kl": test["kl"], "test_loss": test["loss"],
                   "trainsub_recon": train["recon"], "trainsub_kl": train["kl"], "trainsub_loss": train["loss"],
                   "gen_gap": test["recon"] - train["recon"],
                   **({"val_recon": val["recon"], "val_kl": val["kl"]} if val is not None else {})}
            self.epoch_rows.append(row)
            log.info("epoch %d/%d  train loss %.2f (recon %.2f, kl %.2f)  test recon %.2f kl %.2f  gap %.2f  "
                     "%.0f img/s%s", self.epoch, s.epochs, row["train_loss"], row["train_recon"], row["train_kl"],
                     row["test_recon"], row["test_kl"], row["gen_gap"], row["images_per_s"],
                     f"  val recon {val['recon']:.2f}" if val is not None else "")
            evaluated = (("test", test), ("trainsub", train), ("val", val))
            self.logger.log({f"{split}/{k}": v for split, d in evaluated if d is not None
                             for k, v in d.items() if k != "mu"} | {"epoch": self.epoch, "gen_gap": row["gen_gap"],
                                                        "train/epoch_loss": row["train_loss"],
                                                        "train/images_per_s": row["images_per_s"]},
                            step=self.step)
            grid_due = self.epoch % s.image_interval == 0 or last
            wandb_due = bool(s.wandb_image_interval) and (self.epoch % s.wandb_image_interval == 0 or last)
            if grid_due or wandb_due:  # W&B logs the grid file, so it is written whenever either is due
                path = self.save_recon_grid(self.run_dir / f"recon_epoch{self.epoch:03d}.png")
                if wandb_due:
                    self.logger.log_images({"recon": path}, step=self.step)
            self.write_history()
            if last:
                break
            now = time.monotonic()
            stop = s.deadline is not None and time.time() + (now - epoch_start) > s.deadline
            if s.checkpoint and (stop or now - last_checkpoint >= s.checkpoint_every_s):
                atomic_torch_save(self.state_dict(), self.run_dir / "checkpoint.pt")
                last_checkpoint = time.monotonic()
            if stop:
                raise DeadlineReached(self.epoch)

    # ------------------------------------------------------------------ outputs

    @torch.inference_mode()
    def save_recon_grid(self, path: Path) -> Path:
        """The first test image of each class, in class order (top row), over their reconstructions from the
        posterior mean (bottom row)."""
        self.model.eval()
        x = to_unit_range(self.grid_x)
        with self._ctx():
            mu, _ = self.model.encode(x)
            x_hat = self.model.decode(mu).float()
        self.model.train()
        _save_grid(torch.cat([x, x_hat]), path, nrow=x.shape[0])
        return path

    @torch.inference_mode()
    def save_samples(self, path: Path) -> Path:
        """Decoded samples from the prior N(0, I), with a generator fixed by the seed."""
        self.model.eval()
        gen = torch.Generator(device=self.data.test_x.device).manual_seed(self.s.seed)
        with self._ctx():
            x = self.model.sample(SAMPLE_IMAGES, generator=gen).float()
        self.model.train()
        _save_grid(x, path, nrow=8)
        return path

    def write_history(self) -> None:
        frame = pd.DataFrame(self.epoch_rows + self.step_rows)
        if not frame.empty:
            frame = frame.sort_values(["step", "kind"], kind="stable")
        atomic_write(self.run_dir / "history.csv", lambda f: f.write(frame.to_csv(index=False).encode()))

    def final(self) -> dict:
        """End-of-run metrics; the last epoch's evaluation is reused when it is of this model state."""
        s = self.s
        test = train = None
        if self._last_eval is not None and self._last_eval[0] == self.epoch:
            _, test, train = self._last_eval
        classifier = None
        if s.cache_dir is not None:  # trained on this run's images once, then cached for every run on them
            classifier = load_or_train(self.data, s.cache_dir, s.classifier_epochs, device=self.data.test_x.device)
        return final_metrics(self.model, self.data.test_x, self.data.test_y, self.trainsub_x, self.trainsub_y,
                             s.beta, s.eval_batch_size, self.autocast, test=test, train=train,
                             iw_samples=s.iw_samples, iw_images=s.iw_images, sample_images=s.sample_images,
                             seed=s.seed, classifier=classifier, inception_weights=s.inception_weights)


def build_trainer(cfg, data: ImageData, runtime: Runtime, run_dir: Path, logger, config_hash: str | None = None,
                  stock_dropout: bool = False) -> Trainer:
    """The seeded model (channels_last, and compiled when trainer.compile) and its Trainer, for a
    resolved config and data already on the runtime's device."""
    seed_everything(cfg.seed)
    model = place_model(build_model(cfg, data.image_size, data.channels, stock_dropout), runtime.device)
    step_model = torch.compile(model) if cfg.trainer.compile else model
    return Trainer(model, data, RunSettings.from_cfg(cfg), run_dir, logger, runtime.autocast_factory, step_model,
                   config_hash=config_hash or hash_config(cfg))


def first_of_each_class(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """The index of the first image of each class in `labels`, for the first `limit` classes in class order."""
    labels = labels.cpu()
    return torch.stack([torch.nonzero(labels == c)[0, 0] for c in torch.unique(labels)[:limit]])


def _save_grid(x: torch.Tensor, path: Path, nrow: int) -> None:
    images = (x.detach().cpu().clamp(-1, 1) + 1) / 2
    atomic_write(path, lambda f: save_image(images, f, nrow=nrow, padding=2, format="png"))
