"""Fill a folder with what the GPU machine lacks, for scripts/gpu_study.sh to carry there.

    python scripts/gpu_prepare.py .gpu [--data ../shared/datasets/cifar10-jpg.tar.gz]   (make gpu-prep)

The GPU machine has torch, torchvision, numpy, pandas, scipy, statsmodels, seaborn,
scikit-learn, PyYAML and markdown, but no package registry and none of the pure-Python
packages below. They are copied, file by file, from this environment's installed
distributions into <dir>/site/ (no compiled code: the machine's Python may be another
version), and the data archive into <dir>/. The folder's size is printed: a device call
carries at most 64 MiB.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import sys
from pathlib import Path

# Pure-Python distributions the suite imports there (logger=none, so not wandb).
CARRIED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "hydra-joblib-launcher", "pytorch-msssim")


def copy_distribution(name: str, site: Path) -> int:
    """Copy an installed distribution's package files (not its metadata or caches) into `site`."""
    dist = md.distribution(name)
    copied = 0
    for f in dist.files or []:
        parts = Path(f).parts
        if parts[0].endswith((".dist-info", ".egg-info")) or "__pycache__" in parts or parts[0] == "..":
            continue
        if Path(f).suffix in (".so", ".pyd"):
            sys.exit(f"gpu_prepare: {name} holds compiled code ({f}); it cannot be carried as files")
        src = Path(dist.locate_file(f))
        dest = site / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        copied += src.stat().st_size
    return copied


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--data", type=Path, help="the CIFAR-10 archive to carry (default: none)")
    args = p.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    site = args.dir / "site"
    site.mkdir(parents=True)
    for name in CARRIED:
        try:
            size = copy_distribution(name, site)
        except md.PackageNotFoundError:
            sys.exit(f"gpu_prepare: {name} is not installed here; run make install first")
        print(f"{name:28s} {size / 2**20:6.2f} MiB")
    if args.data:
        if not args.data.is_file():
            sys.exit(f"gpu_prepare: the data archive {args.data} is missing; pass --data PATH")
        shutil.copy2(args.data, args.dir / args.data.name)
    total = sum(f.stat().st_size for f in args.dir.rglob("*") if f.is_file())
    print(f"{args.dir}: {total / 2**20:.1f} MiB in all (a device call carries at most 64 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
