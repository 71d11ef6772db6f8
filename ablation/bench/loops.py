"""The timed loops of one width: the suite's training loop, the seed-style loop, the two bare
model steps and evaluation, each with its own model and optimizer from one composed config.

`bench_width` times them in alternating rounds and reports medians and the ratios between them;
the FLOP-limit fractions are added later by `peak.apply_peak`.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms as T

from ..config import ConfigError
from ..data import ImageData, locate, stratified_indices, subset, to_unit_range
from ..evaluate import evaluate
from ..model import build_model
from ..objective import vae_loss
from ..runtime import Runtime, place_model
from ..trainer import RunSettings, build_trainer, make_optimizer, seed_everything
from ..wandb_logger import NullLogger
from .peak import timed

log = logging.getLogger(__name__)

LOOPS = ("suite", "seed_style", "model_step", "seed_step", "eval")
SEED_LOOPS = ("seed_style", "seed_step")  # always fp32, as the seed ran; the others at --precision

# Targets (reported, never asserted). suite/seed-style depends on the width.
TARGET_SUITE_VS_SEED = {32: 2.5, 128: 1.3}
TARGET_SUITE_VS_STEP = 0.9
TARGET_EVAL_VS_TRAIN = 3.0

# The seed's settings, spelled out for the seed-style loop as the seed's code had them.
SEED_BATCH, SEED_WORKERS, SEED_LR, SEED_WEIGHT_DECAY, SEED_BETA = 128, 2, 1e-3, 1e-4, 4.0


# ----------------------------------------------------------------------------- models and FLOPs


def seed_model(cfg, image_size: int, channels: int) -> torch.nn.Module:
    """The model as the seed ran it: the suite's architecture and initial weights (same seed), with
    torch's stock nn.Dropout in place of `ablation.model.Dropout`, in the default memory format."""
    seed_everything(cfg.seed)
    return build_model(cfg, image_size, channels, stock_dropout=True)


def count_flops(cfg, images: torch.Tensor, settings: RunSettings, runtime: Runtime) -> dict:
    """FLOPs per image of one training step (forward + backward) and of one eval forward pass."""
    device = runtime.device
    seed_everything(cfg.seed)
    model = build_model(cfg, images.shape[-1], images.shape[1]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = to_unit_range(images[:settings.batch_size].to(device))
    model.train()
    with FlopCounterMode(display=False) as counter:
        with runtime.autocast():
            out = model(x)
        vae_loss(out.recon, x, out.mu, out.logvar, settings.beta).total.backward()
    train = counter.get_total_flops() / x.shape[0]
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        with runtime.autocast():
            model(x)
    forward = counter.get_total_flops() / x.shape[0]
    return {"train_per_image": train, "forward_per_image": forward, "batch": int(x.shape[0])}


# ----------------------------------------------------------------------------- the seed-style dataset


def seed_dataset(root: str | Path, scratch: Path, image_size: int):
    """The training split as the seed read it: torchvision ImageFolder (or CIFAR10) with PIL transforms.

    `data.locate` finds the data under `root` (through a wrapping folder too). The seed read image
    files, so an archive, which data.py decodes without unpacking, is unpacked under `scratch`
    first: a folder of this bench run, removed with it.
    """
    transform = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(image_size, padding=4), T.ToTensor(),
                           T.Normalize((0.5,) * 3, (0.5,) * 3)])
    layout, where = locate(Path(root).expanduser())
    if layout == "archive":
        layout, where = locate(unpack(where, scratch / "seed-data"))
    if layout == "cifar10":  # `where` is the cifar-10-batches-py folder; torchvision wants its parent
        return datasets.CIFAR10(str(where.parent), train=True, download=False, transform=transform)
    if layout != "imagefolder":
        raise ConfigError(f"data.root '{root}' is not readable by the seed-style loop (layout {layout})")
    return datasets.ImageFolder(str(where / "train"), transform=transform)


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack the tar archive `archive` into the new folder `dest`; return `dest`."""
    log.info("unpacking %s into %s for the seed-style loop", archive, dest)
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(dest)
    return dest


# ----------------------------------------------------------------------------- one width


class WidthBench:
    """The loops of one width, each with its own model and optimizer built from one composed config."""

    def __init__(self, cfg, full: ImageData, runtime: Runtime, images: int, run_dir: Path, seed_ds) -> None:
        self.cfg, self.runtime, self.device = cfg, runtime, runtime.device
        self.settings = s = RunSettings.from_cfg(cfg)
        # -- suite: what a training run builds (ablation.trainer.build_trainer), then Trainer.train_epoch()
        self.data = subset(full, images, cfg.data.test_size, cfg.data.subset_seed).to(self.device)
        self.trainer = build_trainer(cfg, self.data, runtime, run_dir, NullLogger())
        self.images = int(self.data.train_x.shape[0])
        self.eval_images = int(self.data.test_x.shape[0])

        # -- seed-style: the same images (the suite's stratified subset indices), a fresh model
        idx = stratified_indices(full.train_y, images, cfg.data.subset_seed)
        targets = torch.as_tensor(seed_ds.targets)[idx]
        self.same_images = bool(torch.equal(targets, full.train_y[idx].cpu()))
        if not self.same_images:
            log.warning("the seed-style dataset's labels differ from the suite's at the subset indices; "
                        "the two loops may see different images")
        self.loader = DataLoader(Subset(seed_ds, idx.tolist()), batch_size=SEED_BATCH, shuffle=True,
                                 num_workers=SEED_WORKERS, persistent_workers=True)
        self.seed_model = seed_model(cfg, self.data.image_size, self.data.channels).to(self.device)
        self.seed_opt = torch.optim.Adam(self.seed_model.parameters(), lr=SEED_LR, weight_decay=SEED_WEIGHT_DECAY)
        # -- seed step: the seed's model and optimizer on the fixed batch, in the default layout
        self.seed_step_model = seed_model(cfg, self.data.image_size, self.data.channels).to(self.device)
        self.seed_step_opt = torch.optim.Adam(self.seed_step_model.parameters(), lr=SEED_LR,
                                              weight_decay=SEED_WEIGHT_DECAY)

        # -- model step: one fixed float batch, a fresh model, the suite's optimizer and autocast
        seed_everything(cfg.seed)
        self.step_model = place_model(build_model(cfg, self.data.image_size, self.data.channels), self.device)
        self.step_opt = make_optimizer(self.step_model, s)
        self.step_x = to_unit_range(self.data.train_x[:s.batch_size])
        self.step_count = len(self.trainer.batches)

    def suite(self) -> int:
        self.trainer.train_epoch()
        return self.images

    def seed_style(self) -> int:
        model, opt, n = self.seed_model, self.seed_opt, 0
        model.train()
        for x, _ in self.loader:
            x = x.to(self.device)
            x_hat, mu, logvar = model(x)  # the seed's own tuple unpacking
            loss = vae_loss(x_hat, x, mu, logvar, SEED_BETA).total
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
            n += x.shape[0]
        return n

    def model_step(self) -> int:
        return self._steps(self.step_model, self.step_opt, self.step_x, self.runtime.autocast)

    def seed_step(self) -> int:
        return self._steps(self.seed_step_model, self.seed_step_opt, self.step_x.contiguous(), contextlib.nullcontext)

    def _steps(self, model, opt, x: torch.Tensor, context: Callable[[], ContextManager]) -> int:
        model.train()
        for _ in range(self.step_count):
            with context():
                out = model(x)
            loss = vae_loss(out.recon, x, out.mu, out.logvar, self.settings.beta).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return self.step_count * x.shape[0]

    def eval(self) -> int:
        evaluate(self.trainer.model, self.data.test_x, self.settings.beta, self.settings.eval_batch_size,
                 self.runtime.autocast_factory)
        return self.eval_images

    def close(self) -> None:
        self.loader = None  # shuts the persistent workers down
        gc.collect()


def bench_width(cfg, full: ImageData, runtime: Runtime, images: int, repeats: int, warmup: int, seed_ds,
                sample_peak: Callable[[], None]) -> dict:
    """Alternating rounds of the loops (one GEMM-peak sample after each round); medians.

    The FLOP-limit fractions are filled in later by `apply_peak`, once the best peak of the
    whole process is known (a peak sampled while the machine was busy would flatter every loop).
    """
    width = int(cfg.model.width)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as run_dir:
        wb = WidthBench(cfg, full, runtime, images, Path(run_dir), seed_ds)
        try:
            flops = count_flops(cfg, wb.data.train_x, wb.settings, runtime)
            samples: dict[str, list[tuple[int, float]]] = {name: [] for name in LOOPS}
            for r in range(warmup + repeats):
                tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
                for name in LOOPS:  # alternating: A, B, C, D, A, B, C, D, ...
                    n, seconds = timed(getattr(wb, name), runtime.device)
                    if r >= warmup:
                        samples[name].append((n, seconds))
                    log.info("width %d %s: %-10s %6d images in %6.2f s = %8.1f images/s", width, tag, name, n,
                             seconds, n / seconds)
                sample_peak()
        finally:
            wb.close()
    loops = {}
    for name, runs in samples.items():
        rates = [n / s for n, s in runs]
        loops[name] = {"images_per_s": statistics.median(rates), "samples_images_per_s": rates,
                       "seconds": [s for _, s in runs], "images": runs[0][0],
                       "precision": "fp32" if name in SEED_LOOPS else runtime.precision}
    suite = loops["suite"]["images_per_s"]
    ratios = {
        "suite_vs_seed_style": _ratio(suite / loops["seed_style"]["images_per_s"], TARGET_SUITE_VS_SEED.get(width)),
        "suite_vs_model_step": _ratio(suite / loops["model_step"]["images_per_s"], TARGET_SUITE_VS_STEP),
        "eval_vs_train": _ratio(loops["eval"]["images_per_s"] / suite, TARGET_EVAL_VS_TRAIN),
        "model_step_vs_seed_step": _ratio(loops["model_step"]["images_per_s"] / loops["seed_step"]["images_per_s"],
                                          None),
    }
    return {
        "width": width, "images": wb.images, "eval_images": wb.eval_images, "batch_size": wb.settings.batch_size,
        "eval_batch_size": wb.settings.eval_batch_size, "seed_style_same_images": wb.same_images,
        "flops": flops, "loops": loops, "ratios": ratios,
    }


def _ratio(value: float, target: float | None) -> dict:
    return {"value": value, "target": target, "met": None if target is None else bool(value >= target)}
