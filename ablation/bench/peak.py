"""The machine's GEMM peak, and the FLOP-limit images/s of each loop derived from it.

The peak is the best n x n x n GEMM through each library the model's layers use, sampled once
at the start and again after every round of loops; the best of the whole process counts, since
a sample taken while the machine was busy would flatter every loop's fraction of the limit.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], int], device: torch.device) -> tuple[int, float]:
    """(images processed, seconds) of fn(), with the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    n = fn()
    sync(device)
    return n, time.perf_counter() - start


def _gemm_kernels(device: torch.device, n: int, dtype) -> dict[str, Callable[[], None]]:
    """The same n x n x n fp GEMM through each library the model's layers use on `device`.

    mm: torch.mm, i.e. BLAS (MKL or OpenBLAS on the CPU, cuBLAS on CUDA): the linear layers.
    onednn_conv1x1 (CPU with oneDNN): a 1x1 convolution over n positions of n channels in
    channels_last, the kernel family of the model's convolutions. On some CPUs oneDNN's kernel is
    much faster than the BLAS sgemm, so the machine's peak is the best of both.
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
            _, seconds = timed(once, device)
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
