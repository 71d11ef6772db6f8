"""Throughput bench: the suite's training loop against a seed-style loop, the bare model step and evaluation.

    python -m ablation.bench                         # widths 32 and 128, 3 repeats, results/bench/
    python -m ablation.bench --tiny --no-rss         # generated data, width 8: well under a minute
    python -m ablation.bench --data-root /path/cifar10-jpg.tar.gz --widths 32 --repeats 5
    python -m ablation.bench --sweep                 # also runs/hour of the smoke factorial (slow)
    python -m ablation.bench --precision bf16 --out results/bench/bf16/bench.json   # the suite's loops in bf16

In one process, for each width, five loops are timed in alternating rounds
(suite, seed_style, model_step, seed_step, eval, suite, ...), after one warm-up round, and
the medians are reported:

suite        `Trainer.train_epoch()` of ablation.trainer, the loop `ablation.train` runs, built from a
             config composed with Hydra (`regularizer=all logger=none`) on a fixed number of real
             images; end to end: batch gathering and augmentation of the in-memory uint8 tensor included.
seed_style   the seed's loop on the same images, architecture, initial weights, width and regularizers,
             written as the seed wrote it: torchvision ImageFolder (or CIFAR10) with PIL transforms in a
             DataLoader (batch 128, 2 persistent workers), the seed's model (`seed_model`: torch's stock
             nn.Dropout, default memory format), Adam with weight decay 1e-4, `vae_loss` with beta 4 and
             `loss.item()` every step.
model_step   the suite's model and optimizer (channels_last, `ablation.model.Dropout`, fused Adam): forward,
             loss, backward and Adam step on one fixed in-memory float batch: the ceiling for any data pipeline.
seed_step    the same step with the seed's model, layout and optimizer (torch's default Adam):
             model_step / seed_step is the part of the suite's gain that comes from the model code,
             suite / model_step the part from the data path.
eval         `ablation.evaluate.evaluate` on the test images (inference mode, eval batch from the config).

The suite's loops run at `trainer.precision` (`--precision`, default auto: fp32 on the CPU), the
seed's always in fp32. It also counts the model's FLOPs per image (torch.utils.flop_counter),
measures the machine's fp32 GEMM peak (the best of torch.mm and, on the CPU, a oneDNN 1x1
convolution; with bf16 also the bf16 peak, the limit of the suite's loops), derives each loop's
fraction of the FLOP-limit images/s, and measures the peak RSS of a `budget=cpu` training run in a
subprocess. The process keeps its freed memory as a training run does (`trainer.reuse_memory`,
ablation/allocator.py), and since that is a setting of the whole process, the seed-style loops
run with it too: they are faster than the seed under the C library's defaults, so the
suite / seed-style ratios are conservative. Results go to results/bench/bench.json (`--out`)
and a Markdown table beside it (bench.md). Targets are reported with "target met", never asserted.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from . import allocator
from . import config as C
from .data import detect_layout, load_images, stratified_indices, subset, to_unit_range
from .evaluate import evaluate
from .model import build_model
from .objective import vae_loss
from .runio import atomic_write_json, atomic_write_text, read_json
from .train import build_trainer, choose_precision, choose_threads, place_model, prepare, resolve_precision
from .trainer import RunSettings, make_optimizer, seed_everything
from .wandb_logger import NullLogger

log = logging.getLogger("ablation.bench")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("results/bench/bench.json")
LOOPS = ("suite", "seed_style", "model_step", "seed_step", "eval")
SEED_LOOPS = ("seed_style", "seed_step")  # always fp32, as the seed ran; the others at --precision
# Images per repeat of the training loops: a few seconds each on a 2-core CPU.
DEFAULT_IMAGES = {32: 2048, 128: 512}
TINY_WIDTH, TINY_IMAGES, TINY_TRAIN, TINY_TEST = 8, 256, 256, 128

# Targets (reported, never asserted). suite/seed-style depends on the width.
TARGET_SUITE_VS_SEED = {32: 2.5, 128: 1.3}
TARGET_SUITE_VS_STEP = 0.9
TARGET_EVAL_VS_TRAIN = 3.0
TARGET_RSS_GIB = 2.0

# The seed's settings, spelled out for the seed-style loop.
SEED_BATCH, SEED_WORKERS, SEED_LR, SEED_WEIGHT_DECAY, SEED_BETA = 128, 2, 1e-3, 1e-4, 4.0


# ----------------------------------------------------------------------------- helpers


def default_images(width: int) -> int:
    """Images per repeat: 2048 at width 32, 512 at 128; cost ~ width^2 elsewhere (whole batches)."""
    if width in DEFAULT_IMAGES:
        return DEFAULT_IMAGES[width]
    n = 2048 * (32 / width) ** 2
    return int(min(8192, max(256, round(n / 128) * 128)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], int], device: torch.device) -> tuple[int, float]:
    """(images processed, seconds) of fn(), with the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    n = fn()
    _sync(device)
    return n, time.perf_counter() - start


def _override_value(value: str) -> str:
    """A path as a Hydra override value: quoted when it holds characters the grammar treats specially."""
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./~+@:")
    if value and all(ch in safe for ch in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_config(overrides: list[str]):
    """The primary config composed with Hydra's compose API, as `python -m ablation.train <overrides>`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    info = {"cpu": cpu, "cores": cores, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device), "python": platform.python_version(),
            "platform": platform.platform(), "malloc": allocator.applied()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------- FLOPs and peak


def _gemm_kernels(device: torch.device, n: int, dtype) -> dict[str, Callable[[], None]]:
    """The same n x n x n fp GEMM through each library the model's layers use on `device`.

    mm: torch.mm, i.e. BLAS (MKL or OpenBLAS on the CPU, cuBLAS on CUDA): the linear layers.
    onednn_conv1x1 (CPU with oneDNN): a 1x1 convolution over n positions of n channels in
    channels_last, the kernel family of the model's convolutions. The two can differ by 2x: on the
    development machine's AMD EPYC, MKL's sgemm reaches about 230 GFLOP/s and oneDNN about 460, so
    the machine's peak is the best of both.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty_like(a)
    kernels = {"mm": lambda: torch.mm(a, b, out=out)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        x = a.view(1, n, n, 1).contiguous(memory_format=torch.channels_last)  # n positions x n channels
        w = b.view(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        kernels["onednn_conv1x1"] = lambda: torch.nn.functional.conv2d(x, w)
    for kernel in kernels.values():
        kernel()  # warm-up: thread pool, BLAS/cuBLAS/oneDNN initialisation
    return kernels


def gemm_peak_gflops(device: torch.device, n: int, reps: int = 5, dtype=torch.float32) -> dict:
    """Best-of-`reps` GFLOP/s (2 n^3 flops) of each GEMM kernel of `_gemm_kernels`; `gflops` is the best of all."""
    kernels = _gemm_kernels(device, n, dtype)
    result = {"n": n, "dtype": str(dtype).replace("torch.", ""), "kernels": {}}
    for name, kernel in kernels.items():
        def once(kernel=kernel) -> int:
            kernel()
            return n

        samples = []
        for _ in range(reps):
            _, seconds = _timed(once, device)
            samples.append(2 * n ** 3 / max(seconds, 1e-12) / 1e9)
        result["kernels"][name] = {"gflops": max(samples), "samples_gflops": samples}
    _best_kernel(result)
    return result


def _best_kernel(peak: dict) -> None:
    """Sets peak["gflops"] and peak["kernel"] to the best kernel's best sample, and the flat sample list."""
    best = max(peak["kernels"], key=lambda name: peak["kernels"][name]["gflops"])
    peak["kernel"], peak["gflops"] = best, peak["kernels"][best]["gflops"]
    peak["samples_gflops"] = [g for k in peak["kernels"].values() for g in k["samples_gflops"]]


def add_peak_samples(peak: dict, more: dict) -> None:
    """Merges a later `gemm_peak_gflops` measurement into `peak`: the best of the whole process counts."""
    for name, kernel in more["kernels"].items():
        mine = peak["kernels"].setdefault(name, {"gflops": 0.0, "samples_gflops": []})
        mine["samples_gflops"] += kernel["samples_gflops"]
        mine["gflops"] = max(mine["samples_gflops"])
    _best_kernel(peak)


def count_flops(cfg, images: torch.Tensor, settings: RunSettings, device: torch.device, autocast) -> dict:
    """FLOPs per image of one training step (forward + backward) and of one eval forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    seed_everything(cfg.seed)
    model = build_model(cfg, images.shape[-1], images.shape[1]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = to_unit_range(images[:settings.batch_size].to(device))
    ctx = autocast or contextlib.nullcontext
    model.train()
    with FlopCounterMode(display=False) as counter:
        with ctx():
            x_hat, mu, logvar = model(x)
        vae_loss(x_hat, x, mu, logvar, settings.beta).total.backward()
    train = counter.get_total_flops() / x.shape[0]
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        with ctx():
            model(x)
    forward = counter.get_total_flops() / x.shape[0]
    return {"train_per_image": train, "forward_per_image": forward, "batch": int(x.shape[0])}


def seed_model(cfg, image_size: int, channels: int) -> torch.nn.Module:
    """The model as the seed ran it: the suite's architecture and initial weights (same seed), with
    torch's stock nn.Dropout in place of `ablation.model.Dropout`, in the default memory format."""
    seed_everything(cfg.seed)
    return build_model(cfg, image_size, channels, dropout_layer=torch.nn.Dropout)


# ----------------------------------------------------------------------------- the seed-style dataset


def extract_once(archive: Path, cache_dir: Path) -> Path:
    """Unpack `archive` under cache_dir/extracted/ once (keyed by path, size and mtime); return the folder."""
    stat = archive.stat()
    key = f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    dest = cache_dir / "extracted" / f"{archive.name.split('.')[0]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    marker = dest / ".complete"
    if marker.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # an interrupted extraction
        shutil.rmtree(dest, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    log.info("extracting %s to %s for the seed-style loop (once)", archive, dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(tmp)
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def seed_dataset(root: str | os.PathLike, cache_dir: str | os.PathLike, image_size: int):
    """The training split as the seed read it: torchvision ImageFolder (or CIFAR10) with PIL transforms."""
    from torchvision import datasets, transforms as T

    transform = T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(image_size, padding=4), T.ToTensor(),
                           T.Normalize((0.5,) * 3, (0.5,) * 3)])
    root = Path(root).expanduser()
    layout = detect_layout(root)
    if layout == "archive":
        root = extract_once(root, Path(cache_dir).expanduser())
        layout = detect_layout(root)
    if layout == "cifar10":
        base = root.parent if root.name == "cifar-10-batches-py" else root
        if not (base / "cifar-10-batches-py").is_dir():  # an unpacked archive: root/<name>/cifar-10-batches-py
            base = next(p.parent for p in base.rglob("cifar-10-batches-py") if p.is_dir())
        return datasets.CIFAR10(str(base), train=True, download=False, transform=transform)
    if layout != "imagefolder":
        raise C.ConfigError(f"data.root '{root}' is not readable by the seed-style loop (layout {layout})")
    while not (root / "train").is_dir():  # root/<name>/{train,test}
        root = next(c for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith("."))
    return datasets.ImageFolder(str(root / "train"), transform=transform)


# ----------------------------------------------------------------------------- one width


class WidthBench:
    """The loops of one width, each with its own model and optimizer built from one composed config."""

    def __init__(self, cfg, full, device: torch.device, images: int, run_dir: Path, seed_ds) -> None:
        self.cfg, self.device = cfg, device
        self.autocast = choose_precision(cfg.trainer.precision, device)
        self.settings = s = RunSettings.from_cfg(cfg)
        # -- suite: exactly what ablation.train._run builds, then Trainer.train_epoch()
        self.data = subset(full, images, cfg.data.test_size, cfg.data.subset_seed).to(device)
        self.trainer = build_trainer(cfg, self.data, device, run_dir, NullLogger())
        self.images = int(self.data.train_x.shape[0])
        self.eval_images = int(self.data.test_x.shape[0])

        # -- seed-style: the same images (the suite's stratified subset indices), a fresh model
        from torch.utils.data import DataLoader, Subset

        idx = stratified_indices(full.train_y, images, cfg.data.subset_seed)
        targets = torch.as_tensor(seed_ds.targets)[idx]
        self.same_images = bool(torch.equal(targets, full.train_y[idx].cpu()))
        if not self.same_images:
            log.warning("the seed-style dataset's labels differ from the suite's at the subset indices; "
                        "the two loops may see different images")
        self.loader = DataLoader(Subset(seed_ds, idx.tolist()), batch_size=SEED_BATCH, shuffle=True,
                                 num_workers=SEED_WORKERS, persistent_workers=True)
        self.seed_model = seed_model(cfg, self.data.image_size, self.data.channels).to(device)
        self.seed_opt = torch.optim.Adam(self.seed_model.parameters(), lr=SEED_LR, weight_decay=SEED_WEIGHT_DECAY)
        # -- seed step: the seed's model and optimizer on the fixed batch, in the default layout
        self.seed_step_model = seed_model(cfg, self.data.image_size, self.data.channels).to(device)
        self.seed_step_opt = torch.optim.Adam(self.seed_step_model.parameters(), lr=SEED_LR,
                                              weight_decay=SEED_WEIGHT_DECAY)

        # -- model step: one fixed float batch, a fresh model, the suite's optimizer and autocast
        seed_everything(cfg.seed)
        self.step_model = place_model(build_model(cfg, self.data.image_size, self.data.channels), device)
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
            x_hat, mu, logvar = model(x)
            loss = vae_loss(x_hat, x, mu, logvar, SEED_BETA).total
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
            n += x.shape[0]
        return n

    def model_step(self) -> int:
        return self._steps(self.step_model, self.step_opt, self.step_x, self.autocast)

    def seed_step(self) -> int:
        return self._steps(self.seed_step_model, self.seed_step_opt, self.step_x.contiguous(), None)

    def _steps(self, model, opt, x: torch.Tensor, autocast) -> int:
        model.train()
        for _ in range(self.step_count):
            with autocast() if autocast else contextlib.nullcontext():
                x_hat, mu, logvar = model(x)
            loss = vae_loss(x_hat, x, mu, logvar, self.settings.beta).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return self.step_count * x.shape[0]

    def eval(self) -> int:
        evaluate(self.trainer.model, self.data.test_x, self.settings.beta, self.settings.eval_batch_size,
                 self.autocast)
        return self.eval_images

    def close(self) -> None:
        self.loader = None  # shuts the persistent workers down
        gc.collect()


def bench_width(cfg, full, device: torch.device, images: int, repeats: int, warmup: int, seed_ds,
                sample_peak: Callable[[], None]) -> dict:
    """Alternating rounds of the loops (one GEMM-peak sample after each round); medians.

    The FLOP-limit fractions are filled in later by `apply_peak`, once the best peak of the
    whole process is known (a peak sampled while the machine was busy would flatter every loop).
    """
    width = int(cfg.model.width)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as run_dir:
        wb = WidthBench(cfg, full, device, images, Path(run_dir), seed_ds)
        try:
            flops = count_flops(cfg, wb.data.train_x, wb.settings, device, wb.autocast)
            samples: dict[str, list[tuple[int, float]]] = {name: [] for name in LOOPS}
            for r in range(warmup + repeats):
                tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
                for name in LOOPS:  # alternating: A, B, C, D, A, B, C, D, ...
                    n, seconds = _timed(getattr(wb, name), device)
                    if r >= warmup:
                        samples[name].append((n, seconds))
                    log.info("width %d %s: %-10s %6d images in %6.2f s = %8.1f images/s", width, tag, name, n,
                             seconds, n / seconds)
                sample_peak()
        finally:
            wb.close()
    loops = {}
    suite_precision = "fp32" if wb.autocast is None else "bf16"
    for name, runs in samples.items():
        rates = [n / s for n, s in runs]
        loops[name] = {"images_per_s": statistics.median(rates), "samples_images_per_s": rates,
                       "seconds": [s for _, s in runs], "images": runs[0][0],
                       "precision": "fp32" if name in SEED_LOOPS else suite_precision}
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


def apply_peak(width_result: dict, peak_gflops: float, peak_bf16_gflops: float | None = None) -> None:
    """FLOP-limit images/s (peak / FLOPs per image) and each loop's fraction of it; eval against the forward.

    The seed's loops run in fp32; the suite's loops (suite, model_step, eval) at the bench's
    precision, so with bf16 their limit comes from the bf16 GEMM peak (`peak_bf16_gflops`).
    """
    flops = width_result["flops"]
    limits = {"fp32": peak_gflops}
    if peak_bf16_gflops is not None:
        limits["bf16"] = peak_bf16_gflops
    for precision, gflops in limits.items():
        suffix = "" if precision == "fp32" else "_bf16"
        flops[f"peak_{precision}_gflops"] = gflops
        flops[f"flop_limit_train_images_per_s{suffix}"] = gflops * 1e9 / flops["train_per_image"]
        flops[f"flop_limit_eval_images_per_s{suffix}"] = gflops * 1e9 / flops["forward_per_image"]
    for name, loop in width_result["loops"].items():
        gflops = limits[loop["precision"]]
        per_image = flops["forward_per_image" if name == "eval" else "train_per_image"]
        loop["flop_limit_images_per_s"] = gflops * 1e9 / per_image
        loop["fraction_of_flop_limit"] = loop["images_per_s"] / loop["flop_limit_images_per_s"]


def _ratio(value: float, target: float | None) -> dict:
    return {"value": value, "target": target, "met": None if target is None else bool(value >= target)}


# ----------------------------------------------------------------------------- subprocess measurements


def _run_child(cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, int, float]:
    """Run cmd to completion; (exit code, its peak RSS in KiB, seconds).

    The peak is the child's own high-water mark, VmHWM in /proc/<pid>/status, polled until it
    exits (the mark only grows). `ru_maxrss` from wait4 is not used on Linux when it is larger:
    a forked child inherits the parent's high-water mark, so a bench holding the dataset and
    five models would be counted in. Polled every 0.1 s; where /proc is absent, ru_maxrss is the fallback.
    """
    start = time.perf_counter()
    hwm = 0
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT)
        while True:
            hwm = max(hwm, _vm_hwm_kib(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, hwm or int(usage.ru_maxrss), time.perf_counter() - start


def _vm_hwm_kib(pid: int) -> int:
    """The peak resident set size of a live process in KiB (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def measure_rss(budget: str, overrides: list[str], device: str, timeout: float = 1800) -> dict:
    """Peak RSS of `python -m ablation.train budget=<budget> trainer.epochs=1 ...` in a fresh results dir,
    with an empty data cache, so that decoding the images counts as on a first run. One epoch has every
    phase of a run (decode, training, evaluation, final metrics); later epochs repeat them."""
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        data = [o for o in overrides if not o.startswith("data.cache_dir=")]
        cmd = [sys.executable, "-m", "ablation.train", f"budget={budget}", "trainer.epochs=1", "logger=none",
               "regularizer=all", "study=bench-rss", "overwrite=true", f"trainer.device={device}", *data,
               f"data.cache_dir={Path(tmp) / 'cache'}"]
        env = os.environ | {"ABLATION_RESULTS": tmp}
        log.info("peak RSS: %s", " ".join(cmd[1:]))
        rc, kib, seconds = _run_child(cmd, env, Path(tmp) / "train.log", timeout)
        out = {"command": " ".join(["python", *cmd[1:]]), "budget": budget, "returncode": rc,
               "peak_rss_kib": kib, "peak_rss_gib": kib / 2 ** 20, "seconds": seconds,
               "rusage_children_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
               "target_gib": TARGET_RSS_GIB, "met": bool(rc == 0 and kib / 2 ** 20 <= TARGET_RSS_GIB)}
        if rc != 0:
            out["error"] = _tail(Path(tmp) / "train.log")
            log.error("the RSS run failed (exit %d):\n%s", rc, out["error"])
    return out


def measure_sweep(overrides: list[str], device: str, configs=((1, 2), (2, 1)), timeout: float = 3600) -> dict:
    """Runs per hour of the smoke-budget 2^5 factorial with the joblib launcher, per (jobs, threads)."""
    results = []
    for jobs, threads in configs:
        cmd = [sys.executable, "-m", "ablation.train", "-m", "+sweep=factorial", "budget=smoke", "logger=none",
               "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", f"trainer.threads={threads}",
               f"trainer.device={device}", *overrides]
        with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
            env = os.environ | {"ABLATION_RESULTS": tmp}
            log.info("sweep: %d jobs x %d threads: %s", jobs, threads, " ".join(cmd[1:]))
            rc, kib, seconds = _run_child(cmd, env, Path(tmp) / "sweep.log", timeout)
            statuses = [_status(p) for p in Path(tmp).rglob("metrics.json")]
            completed = sum(st == "completed" for st in statuses)
            row = {"jobs": jobs, "threads": threads, "returncode": rc, "runs": len(statuses),
                   "completed": completed, "wall_s": seconds, "runs_per_hour": completed / seconds * 3600,
                   "peak_rss_kib": kib, "command": " ".join(["python", *cmd[1:]])}
            if rc != 0:
                row["error"] = _tail(Path(tmp) / "sweep.log")
                log.error("the sweep failed (exit %d):\n%s", rc, row["error"])
            log.info("sweep: %d jobs x %d threads: %d runs completed in %.0f s = %.0f runs/h", jobs, threads,
                     completed, seconds, row["runs_per_hour"])
            results.append(row)
    best = max(results, key=lambda r: r["runs_per_hour"])
    return {"budget": "smoke", "configs": results, "best": {"jobs": best["jobs"], "threads": best["threads"]}}


def _status(path: Path) -> str | None:
    return (read_json(path) or {}).get("status")


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "no")


def _peak_line(peak: dict, precision: str = "fp32") -> str:
    names = {"mm": "torch.mm", "onednn_conv1x1": "oneDNN 1x1 convolution"}
    n, best = peak["n"], peak["kernel"]
    others = "; ".join(f"{names.get(k, k)} {_fmt(v['gflops'], 1)}" for k, v in peak["kernels"].items() if k != best)
    return (f"Peak {precision} GEMM: {_fmt(peak['gflops'], 1)} GFLOP/s ({names.get(best, best)}, {n}x{n}x{n}, best of "
            f"{len(peak['kernels'][best]['samples_gflops'])} spread over the run{'; ' + others if others else ''}).")


def _malloc_note(malloc: dict | None) -> str:
    if not malloc:
        return " C library allocator defaults (trainer.reuse_memory off or not glibc)."
    mib = {k: ("default" if not v else f"{v >> 30} GiB" if v % (1 << 30) == 0 else f"{v >> 20} MiB")
           for k, v in malloc.items()}
    return (f" glibc malloc thresholds (trainer.reuse_memory): mmap {mib['mmap_threshold']}, trim "
            f"{mib['trim_threshold']}, for every loop, the seed-style ones included.")


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "# Throughput bench",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, device "
        f"{m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}.{_malloc_note(m.get('malloc'))}",
        f"Data: `{s['data_root']}`{' (tiny, generated)' if s['tiny'] else ''}. Medians of {s['repeats']} "
        f"alternating repeats after {s['warmup']} warm-up round(s). Precision: the suite's loops "
        f"{s.get('precision', 'fp32')} (`trainer.precision`), the seed's fp32.",
        _peak_line(result["peak"]),
        *([_peak_line(result["peak_bf16"], "bf16")] if result.get("peak_bf16") else []),
        "",
        "| width | loop | precision | images | images/s (median) | samples | FLOPs/image | FLOP-limit images/s "
        "| % of limit |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for key, w in result["widths"].items():
        fl = w["flops"]
        for name in LOOPS:
            loop = w["loops"][name]
            per = fl["forward_per_image"] if name == "eval" else fl["train_per_image"]
            samples = ", ".join(f"{r:,.0f}" for r in loop["samples_images_per_s"])
            lines.append(f"| {key} | {name} | {loop['precision']} | {loop['images']} | "
                         f"{_fmt(loop['images_per_s'], 1)} | {samples} | {per / 1e6:,.1f} M | "
                         f"{_fmt(loop['flop_limit_images_per_s'], 0)} | {100 * loop['fraction_of_flop_limit']:.1f}% |")
    lines += ["", "| check | width | value | target | target met |", "|---|---:|---:|---:|---|"]
    names = {"suite_vs_seed_style": "suite / seed-style images/s", "suite_vs_model_step": "suite / model step images/s",
             "eval_vs_train": "eval / train (suite) images/s",
             "model_step_vs_seed_step": "model step / seed step images/s (model code)"}
    for key, w in result["widths"].items():
        for rname, label in names.items():
            r = w["ratios"][rname]
            target = "n/a" if r["target"] is None else f">= {r['target']:g}x"
            lines.append(f"| {label} | {key} | {r['value']:.2f}x | {target} | {_met(r['met'])} |")
    rss = result.get("rss")
    if rss:
        value = f"{rss['peak_rss_gib']:.2f} GiB" if rss["returncode"] == 0 else f"failed (exit {rss['returncode']})"
        lines.append(f"| peak RSS, budget={rss['budget']} run (1 epoch, cold data cache) | - | {value} | "
                     f"<= {TARGET_RSS_GIB:g} GiB | "
                     f"{_met(rss['met'])} |")
    sweep = result.get("sweep")
    if sweep:
        lines += ["", f"Sweep throughput: `+sweep=factorial budget={sweep['budget']}` with the joblib launcher.", "",
                  "| jobs | threads/job | runs completed | wall s | runs/hour |", "|---:|---:|---:|---:|---:|"]
        for row in sweep["configs"]:
            lines.append(f"| {row['jobs']} | {row['threads']} | {row['completed']}/{row['runs']} | "
                         f"{row['wall_s']:.0f} | {row['runs_per_hour']:.0f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ablation.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=None, help="model widths (default: 32 128; tiny: 8)")
    p.add_argument("--images", type=int, default=None,
                   help="training images per repeat (default: 2048 at width 32, 512 at 128; tiny: 256)")
    p.add_argument("--eval-images", type=int, default=None,
                   help="test images for the eval loop (default: the budget's test_size: cpu all 10000, tiny 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each loop (default 3; tiny 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds before the repeats (default 1)")
    p.add_argument("--tiny", action="store_true",
                   help="width 8, generated data, a few steps: a self-check that finishes in well under a minute")
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
    p.add_argument("--reuse-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="trainer.reuse_memory for the bench process, as in training (default on); with "
                        "--no-reuse-memory every loop runs under the C library's allocator defaults")
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
    common = ["regularizer=all", "logger=none", f"budget={'smoke' if args.tiny else 'cpu'}",
              f"trainer.device={args.device}", f"trainer.reuse_memory={str(args.reuse_memory).lower()}",
              f"trainer.precision={args.precision}"]
    if args.tiny and not args.data_root:
        from .synthetic import make_imagefolder

        args.data_root = str(make_imagefolder(tmp / "data", n_train=TINY_TRAIN, n_test=TINY_TEST))
    if args.data_root:
        common.append(f"data.root={_override_value(str(Path(args.data_root).expanduser().resolve()))}")
    if args.tiny:
        common.append(f"data.cache_dir={_override_value(str(tmp / 'cache'))}")  # keep ~/.cache clean
    if args.eval_images:
        common.append(f"data.test_size={args.eval_images}")

    base = compose_config(common)
    device, _ = prepare(base)
    if device.type == "cpu":
        torch.set_num_threads(choose_threads(args.threads, None))
    else:
        torch.backends.cudnn.benchmark = True
    root, cache_dir = str(base.data.root), str(base.data.cache_dir)
    log.info("bench on %s (%d threads), data %s", device, torch.get_num_threads(), root)
    full = load_images(root, base.data.download, cache_dir)
    # the training runs of the RSS and sweep measurements: the bench's data and precision
    child_overrides = [f"data.root={_override_value(root)}", f"data.cache_dir={_override_value(cache_dir)}",
                       f"trainer.precision={args.precision}"]

    precision = resolve_precision(base.trainer.precision, device)
    result = {"machine": machine_info(device),
              "settings": {"tiny": args.tiny, "repeats": args.repeats, "warmup": args.warmup, "widths": args.widths,
                           "data_root": root, "loops": list(LOOPS), "overrides": common, "precision": precision}}
    n = 1024 if args.tiny else (8192 if device.type == "cuda" else 2048)
    peaks = {torch.float32: gemm_peak_gflops(device, n, reps=3 if args.tiny else 5)}
    if precision == "bf16":  # the limit of the suite's loops
        peaks[torch.bfloat16] = gemm_peak_gflops(device, n, reps=3 if args.tiny else 5, dtype=torch.bfloat16)
    peak = result["peak"] = peaks[torch.float32]
    if torch.bfloat16 in peaks:
        result["peak_bf16"] = peaks[torch.bfloat16]

    def sample_peak() -> None:  # one more best-of-3 after every round: the best of the whole process counts
        for dtype, best in peaks.items():
            add_peak_samples(best, gemm_peak_gflops(device, n, reps=3, dtype=dtype))

    seed_ds = seed_dataset(root, cache_dir, full.image_size)
    result["widths"] = {}
    for width in args.widths:
        images = args.images or default_images(width)
        cfg = compose_config(common + [f"model.width={width}"])
        prepare(cfg)
        result["widths"][str(width)] = bench_width(cfg, full, device, images, args.repeats, args.warmup,
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


if __name__ == "__main__":
    sys.exit(main())
