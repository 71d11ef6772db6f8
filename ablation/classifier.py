"""The suite's own CIFAR classifier: the feature space of the sample-quality measures.

A small convolutional network, trained once per dataset on its training images and cached,
whose penultimate layer (the global average pool of the last conv block) embeds images for
`ablation.sample_quality`. It stands in for Inception-v3 where no Inception weights are at hand,
so its distances are the suite's own: "FD (suite classifier)", never FID.

Network (input 3×32×32 on the [-1, 1] scale; every conv 3×3, bias-free, then BatchNorm and ReLU):

    conv 3→24 stride 2 (16×16) → conv 24→48 stride 2 (8×8) → conv 48→96 stride 1 (8×8)
    → conv 96→192 stride 2 (4×4) → mean over the 4×4 positions: the 192-d features → linear → logits

About 6 M multiply-adds per image: sized to train on 50,000 images for 15 epochs in minutes on a
2-core CPU.

Training: Adam with a one-cycle learning rate, batches of 256, random flip and 4-pixel crop
(`ablation.data.augment`), `epochs` passes over the training split. Everything it draws (initial
weights, batch order, augmentation) comes from `seed`, so on the CPU it is deterministic for a
given seed and thread count; on CUDA it runs with deterministic cuDNN kernels (not checked here).

Cache: `<data.cache_dir>/classifier-<digest>.pt` holds the state dict, its test accuracy and its
settings. The digest covers the dataset (sha256 over the bytes, shapes and dtypes of the four
tensors and the class names) and every training setting, so the same data loads the file and
different data or settings train a new one. It is written atomically; two runs training at once
each write a complete file, and the last rename wins.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .data import ImageData, augment, content_digest, to_unit_range
from .runio import atomic_torch_save

log = logging.getLogger(__name__)

# Bumped whenever the network or the training procedure changes, so older cache files are not reused.
ARCHITECTURE = "suite-cnn-v1"
FEATURE_BATCH = 500  # images per forward pass when embedding or scoring


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything that decides the trained weights, beside the data; all of it enters the cache digest."""

    epochs: int = 15
    seed: int = 0
    batch_size: int = 256
    lr: float = 3e-3  # the one-cycle peak learning rate of Adam
    widths: tuple[int, ...] = (24, 48, 96, 192)  # output channels of the four conv blocks
    strides: tuple[int, ...] = (2, 2, 1, 2)
    flip: bool = True
    crop_padding: int = 4


class ClassifierNet(nn.Module):
    """Conv blocks (conv 3×3 → BatchNorm → ReLU), a global average pool (the features), a linear head."""

    def __init__(self, n_classes: int, widths: tuple[int, ...], strides: tuple[int, ...], channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for width, stride in zip(widths, strides):
            blocks += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
        self.trunk = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, n_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: the mean of the last block's activations over positions, [N, feature_dim]."""
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- inputs


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images as uint8 [0, 255]: uint8 passes through; floats are read as [-1, 1] (the VAE's Tanh
    output), clamped there and rounded to the nearest of the 256 levels, v = round((x + 1)·127.5).

    Generated and real images thus reach every feature extractor through the same quantization.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], not {images.dtype}")
    return images.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def _batches(images: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
    """`images` (uint8 or [-1, 1] float) in order, on `device`, quantized to uint8 and scaled to [-1, 1]."""
    for start in range(0, images.shape[0], FEATURE_BATCH):
        yield to_unit_range(as_uint8(images[start:start + FEATURE_BATCH]).to(device))


# ----------------------------------------------------------------------------- cache identity


def cache_path(cache_dir: str | os.PathLike, data_digest: str, settings: ClassifierSettings) -> Path:
    """<cache_dir>/classifier-<16 hex>.pt, the digest of the dataset digest, the architecture and the settings."""
    key = json.dumps({"data": data_digest, "architecture": ARCHITECTURE, "settings": asdict(settings)}, sort_keys=True)
    return Path(cache_dir).expanduser() / f"classifier-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


# ----------------------------------------------------------------------------- training


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the block and restore the caller's RNG states (and cuDNN flags) afterwards.

    The classifier may be trained in the middle of another run; forking the RNG keeps that run's
    random stream as it would have been without it.
    """
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@torch.inference_mode()
def accuracy(net: ClassifierNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` whose arg-max logit is the label, in eval mode."""
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for start, x in zip(range(0, images.shape[0], FEATURE_BATCH), _batches(images, device)):
        y = labels[start:start + FEATURE_BATCH].to(device)
        correct += int((net(x).argmax(dim=1) == y).sum())
    return correct / max(1, images.shape[0])


def _train_batches(images: torch.Tensor, labels: torch.Tensor, settings: ClassifierSettings,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented training batches on the images' device: ([-1, 1] images, labels)."""
    order = torch.randperm(images.shape[0], generator=generator, device=images.device)
    for start in range(0, images.shape[0], settings.batch_size):
        idx = order[start:start + settings.batch_size]
        x = augment(images[idx], settings.flip, settings.crop_padding, generator)
        yield to_unit_range(x), labels[idx]


def train_classifier(data: ImageData, settings: ClassifierSettings, device: torch.device | str = "cpu"
                     ) -> tuple[ClassifierNet, float]:
    """Train a ClassifierNet on data's training split; returns it (in eval mode) and its test accuracy."""
    device = torch.device(device)
    images, labels = data.train_x.to(device), data.train_y.to(device)
    steps = settings.epochs * -(-images.shape[0] // settings.batch_size)
    with _seeded(settings.seed, device):
        net = ClassifierNet(len(data.classes), settings.widths, settings.strides, data.channels).to(device)
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps)
        for epoch in range(settings.epochs):
            net.train()
            total, seen = 0.0, 0
            for x, y in _train_batches(images, labels, settings, generator):
                loss = nn.functional.cross_entropy(net(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * y.numel()
                seen += y.numel()
            log.info("suite classifier: epoch %d/%d, train cross-entropy %.4f", epoch + 1, settings.epochs,
                     total / seen)
    net.eval()
    return net, accuracy(net, data.test_x, data.test_y)


# ----------------------------------------------------------------------------- the cached classifier


@dataclass
class SuiteClassifier:
    """A trained ClassifierNet in eval mode, its test accuracy, and the cache file it came from or went to."""

    net: ClassifierNet
    accuracy: float
    path: Path | None
    trained: bool  # True when this process trained it, False when it was loaded from the cache

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """Penultimate-layer features, float64 [N, feature_dim], of `images` [N, 3, H, W].

        `images` are uint8 in [0, 255] or float in [-1, 1] (clamped, then quantized to the uint8
        grid by `as_uint8`), on any device; they are moved to the classifier's device in batches.
        """
        self.net.eval()
        device = next(self.net.parameters()).device
        out = [self.net.features(x).double().cpu() for x in _batches(images, device)]
        if not out:
            return np.zeros((0, self.feature_dim))
        return torch.cat(out).numpy()


def _save(path: Path, net: ClassifierNet, acc: float, data_digest: str, settings: ClassifierSettings,
          n_classes: int, channels: int) -> None:
    blob = {"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "accuracy": acc,
            "architecture": ARCHITECTURE, "settings": asdict(settings), "data_digest": data_digest,
            "n_classes": n_classes, "channels": channels}
    try:
        atomic_torch_save(blob, path)
        log.info("suite classifier cached at %s", path)
    except OSError as exc:
        log.warning("could not write the classifier cache %s (%s); continuing without it", path, exc)


def _load(path: Path, data_digest: str, settings: ClassifierSettings, device: torch.device) -> SuiteClassifier | None:
    """The cached classifier at `path`, or None when absent, unreadable, or made for other data or settings."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        if (blob["data_digest"], blob["architecture"], blob["settings"]) != (data_digest, ARCHITECTURE,
                                                                             asdict(settings)):
            log.warning("ignoring classifier cache %s: it was made for other data or settings", path)
            return None
        net = ClassifierNet(blob["n_classes"], settings.widths, settings.strides, blob["channels"]).to(device)
        net.load_state_dict(blob["state_dict"])
    except Exception as exc:  # a corrupt or foreign file is retrained over, never trusted
        log.warning("ignoring unreadable classifier cache %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    return SuiteClassifier(net.eval(), float(blob["accuracy"]), path, trained=False)


def load_or_train(data: ImageData, cache_dir: str | os.PathLike | None, epochs: int = 15, seed: int = 0,
                  device: torch.device | str = "cpu") -> SuiteClassifier:
    """The suite classifier of `data`: loaded from `cache_dir` when cached, else trained and cached there.

    Pass the whole dataset (not a run's subset), so that every run on it shares one classifier.
    `seed` is the classifier's own seed, the same for every run; with cache_dir=None nothing is
    cached. The result is on `device`.
    """
    device = torch.device(device)
    settings = ClassifierSettings(epochs=epochs, seed=seed)
    digest = content_digest(data)
    path = cache_path(cache_dir, digest, settings) if cache_dir is not None else None
    cached = _load(path, digest, settings, device) if path is not None else None
    if cached is not None:
        log.info("suite classifier loaded from %s (test accuracy %.4f)", path, cached.accuracy)
        return cached
    log.info("training the suite classifier (%d epochs on %d images, %s)", epochs, data.train_x.shape[0], device)
    net, acc = train_classifier(data, settings, device)
    log.info("suite classifier: test accuracy %.4f", acc)
    if path is not None:
        _save(path, net, acc, digest, settings, len(data.classes), data.channels)
    return SuiteClassifier(net, acc, path, trained=True)
