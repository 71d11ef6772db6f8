"""Small generated ImageFolder datasets for tests, CI smoke runs and the bench's tiny mode."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_imagefolder(root: str | Path, n_train: int = 64, n_test: int = 32, n_classes: int = 4,
                     size: int = 32, seed: int = 0, fmt: str = "png") -> Path:
    """Write root/{train,test}/class_k/NNNN.<fmt>: smooth random colour blobs, a class-dependent hue."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % n_classes
            cdir = root / split / f"class_{k}"
            cdir.mkdir(parents=True, exist_ok=True)
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            hue = np.array([k + 1, n_classes - k, (k * 7) % n_classes + 1], dtype=float) / (n_classes + 1)
            img = blob[..., None] * hue * 255 + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(cdir / f"{i:04d}.{fmt}")
    return root
