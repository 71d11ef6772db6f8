"""`python -m ablation.bench` (`make bench`): the arguments, the composed configs, and `run`, which
measures every width and the peaks; `main` writes bench.json and bench.md. The package docstring
(ablation/bench/__init__.py) gives the commands and describes the loops."""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from .. import config as C
from ..data import load_images
from ..runio import atomic_write_json, atomic_write_text
from ..runtime import activate, choose_threads, prepare
from ..synthetic import make_imagefolder
from .loops import LOOPS, bench_width, seed_dataset
from .measure import machine_info, measure_rss, measure_sweep
from .peak import add_peak_samples, apply_peak, gemm_peak_gflops
from .render import markdown

log = logging.getLogger(__name__)

DESCRIPTION = "Throughput bench: the suite's training loop against a seed-style loop, the bare model step and evaluation."
DEFAULT_OUT = Path("results/bench/bench.json")
# Images per repeat of the training loops, sized so that a repeat is a few dozen steps.
DEFAULT_IMAGES = {32: 2048, 128: 512}
TINY_WIDTH, TINY_IMAGES, TINY_TRAIN, TINY_TEST = 8, 256, 256, 128


def default_images(width: int) -> int:
    """Images per repeat: 2048 at width 32, 512 at 128; cost ~ width^2 elsewhere (whole batches)."""
    if width in DEFAULT_IMAGES:
        return DEFAULT_IMAGES[width]
    n = 2048 * (32 / width) ** 2
    return int(min(8192, max(256, round(n / 128) * 128)))


def _override_value(value: str) -> str:
    """A path as a Hydra override value: quoted when it holds characters the grammar treats specially."""
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./~+@:")
    if value and all(ch in safe for ch in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_config(overrides: list[str]):
    """The primary config composed with Hydra's compose API, as `python -m ablation.train <overrides>`."""
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ablation.bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=None, help="model widths (default: 32 128; tiny: 8)")
    p.add_argument("--images", type=int, default=None,
                   help="training images per repeat (default: 2048 at width 32, 512 at 128; tiny: 256)")
    p.add_argument("--eval-images", type=int, default=None,
                   help="test images for the eval loop (default: the budget's test_size: cpu all 10000, tiny 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each loop (default 3; tiny 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds before the repeats (default 1)")
    p.add_argument("--tiny", action="store_true",
                   help="width 8, generated data, a few steps: a quick self-check of every loop")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (CUDA when available) | cpu | cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="trainer.precision of the suite's loops (suite, model_step, eval); the seed's loops "
                        "stay fp32. auto: as in training (bf16 on CUDA with bf16 support, else fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: all cores, as in training)")
    p.add_argument("--data-root", default=None,
                   help="data.root (default: the composed config's, i.e. $ABLATION_DATA or data/cifar10)")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the peak RSS of a budget=cpu training run (budget=smoke with --tiny); default on")
    p.add_argument("--sweep", action="store_true",
                   help="also measure runs/hour of the smoke factorial sweep, 1 job x 2 threads vs 2 jobs x 1 (slow)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"bench.json path (default {DEFAULT_OUT}); the Markdown table goes beside it as .md")
    args = p.parse_args(argv)
    for name in ("images", "eval_images", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.widths is not None and min(args.widths) < 1:
        p.error("--widths must be >= 1")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    if args.tiny:
        args.widths = args.widths or [TINY_WIDTH]
        args.repeats = args.repeats or 1
        args.images = args.images or TINY_IMAGES
    args.widths = args.widths or [32, 128]
    args.repeats = args.repeats or 3
    return args


def run(args: argparse.Namespace, tmp: Path) -> dict:
    """Every measurement of the bench; `tmp` holds the tiny mode's data and an unpacked archive."""
    # no progress bar or lines: they would draw inside the timed loops
    common = ["regularizer=all", "logger=none", f"budget={'smoke' if args.tiny else 'cpu'}",
              f"trainer.device={args.device}", f"trainer.precision={args.precision}", "trainer.progress_every_s=0"]
    if args.tiny and not args.data_root:
        args.data_root = str(make_imagefolder(tmp / "data", n_train=TINY_TRAIN, n_test=TINY_TEST))
    if args.data_root:
        common.append(f"data.root={_override_value(str(Path(args.data_root).expanduser().resolve()))}")
    if args.tiny:
        common.append(f"data.cache_dir={_override_value(str(tmp / 'cache'))}")  # keep ~/.cache clean
    if args.eval_images:
        common.append(f"data.test_size={args.eval_images}")

    base = compose_config(common)
    runtime, _ = prepare(base)
    # the bench's --threads (0: all cores, as a single training run), not the config's trainer.threads
    runtime = replace(runtime, threads=choose_threads(args.threads, None))
    activate(runtime)
    device = runtime.device
    root, cache_dir = str(base.data.root), str(base.data.cache_dir)
    log.info("bench on %s (%d threads), data %s", device, torch.get_num_threads(), root)
    full = load_images(root, base.data.download, cache_dir)
    # the training runs of the RSS and sweep measurements: the bench's data and precision
    child_overrides = [f"data.root={_override_value(root)}", f"data.cache_dir={_override_value(cache_dir)}",
                       f"trainer.precision={args.precision}"]

    result = {"machine": machine_info(device),
              "settings": {"tiny": args.tiny, "repeats": args.repeats, "warmup": args.warmup, "widths": args.widths,
                           "data_root": root, "loops": list(LOOPS), "overrides": common,
                           "precision": runtime.precision}}
    n = 1024 if args.tiny else (8192 if device.type == "cuda" else 2048)
    peaks = {torch.float32: gemm_peak_gflops(device, n, reps=3 if args.tiny else 5)}
    if runtime.precision == "bf16":  # the limit of the suite's loops
        peaks[torch.bfloat16] = gemm_peak_gflops(device, n, reps=3 if args.tiny else 5, dtype=torch.bfloat16)
    peak = result["peak"] = peaks[torch.float32]
    if torch.bfloat16 in peaks:
        result["peak_bf16"] = peaks[torch.bfloat16]

    def sample_peak() -> None:  # one more best-of-3 after every round: the best of the whole process counts
        for dtype, best in peaks.items():
            add_peak_samples(best, gemm_peak_gflops(device, n, reps=3, dtype=dtype))

    seed_ds = seed_dataset(root, tmp, full.image_size)
    result["widths"] = {}
    for width in args.widths:
        images = args.images or default_images(width)
        cfg = compose_config(common + [f"model.width={width}"])
        prepare(cfg)  # resolves and checks cfg in place; its device and precision are the base config's
        result["widths"][str(width)] = bench_width(cfg, full, runtime, images, args.repeats, args.warmup,
                                                   seed_ds, sample_peak)
    for dtype, best in peaks.items():
        log.info("peak %s GEMM: %.1f GFLOP/s (%s, best of %d)", str(dtype).replace("torch.", ""), best["gflops"],
                 best["kernel"], len(best["kernels"][best["kernel"]]["samples_gflops"]))
    for width_result in result["widths"].values():
        apply_peak(width_result, peak["gflops"], result.get("peak_bf16", {}).get("gflops"))
    if args.rss:
        result["rss"] = measure_rss("smoke" if args.tiny else "cpu", child_overrides, args.device)
    if args.sweep:
        result["sweep"] = measure_sweep(child_overrides, args.device)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            result = run(args, Path(tmp))
    except C.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, result)
    md = markdown(result)
    atomic_write_text(args.out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0
