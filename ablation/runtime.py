"""Where and how a run computes: device, precision, autocast and CPU threads, resolved once per run.

`prepare(cfg, job_num, launcher)` reads trainer.device, trainer.precision and trainer.threads,
OMP_NUM_THREADS and the launcher's parallelism, refuses what this machine cannot do with one
`ConfigError`, and returns a `Runtime` that the trainer, the run record and the benchmark all read.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from omegaconf import DictConfig, OmegaConf

from . import config as C
from .config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16
    threads: int  # torch CPU threads of this run

    def autocast(self) -> ContextManager:
        """The forward pass's context: bf16 autocast, or nothing for fp32."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def autocast_factory(self) -> Callable[[], ContextManager] | None:
        """`autocast` for bf16, None for fp32 (evaluation skips the context then)."""
        return self.autocast if self.precision == "bf16" else None


def choose_device(requested: str, job_num: int) -> torch.device:
    """auto: CUDA when available (job k of a parallel sweep prefers GPU k mod n), else the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", job_num % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"trainer.device={requested!r} is not a device; use trainer.device=auto, cpu, cuda "
                          f"or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={requested} is not supported; use trainer.device=auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={requested} but CUDA is not available here; use trainer.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"trainer.device={requested} but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of those or auto")
    return device


def choose_threads(requested: int, launcher: DictConfig | None) -> int:
    """trainer.threads, else OMP_NUM_THREADS when set, else cores / parallel jobs: a joblib sweep of
    n jobs gives each cores // n."""
    if requested:
        return requested
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        first = omp.split(",", 1)[0]  # OpenMP also takes a list, one count per nesting level
        if not first.isdigit() or int(first) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={omp!r} is not a number of threads; set it to e.g. 1, "
                              f"or unset it (or set trainer.threads)")
        return int(first)
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
    that resumes must not change precision. `native_bf16` overrides the CPU probe.
    """
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"trainer.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 "
                              f"support; use trainer.precision=fp32")
        return "bf16"
    if cpu_has_native_bf16() if native_bf16 is None else native_bf16:
        return "bf16"
    raise ConfigError("trainer.precision=bf16 needs bf16 instructions (AVX512-BF16 or AMX), which this CPU "
                      "lacks: bf16 would be emulated, slower than fp32; use trainer.precision=fp32 (or auto)")


def prepare(cfg: DictConfig, job_num: int = 0, launcher: DictConfig | None = None) -> tuple[Runtime, str]:
    """Resolve a composed config in place and the run's runtime, before any data is touched.

    Chooses the device, fills an `auto` budget from it, checks every range, resolves the
    interpolations, and resolves precision and threads. Returns the runtime and the budget's name.
    `job_num` and `launcher` come from Hydra's job when there is one.
    """
    device = choose_device(cfg.trainer.device, job_num)
    requested = cfg.budget.name
    budget = C.resolve_budget(cfg, cuda=device.type == "cuda")
    if requested == "auto":
        log.info("budget=auto chose budget=%s (%s)", budget, "CUDA found" if device.type == "cuda" else "no CUDA")
    C.validate(cfg)
    OmegaConf.resolve(cfg)
    if cfg.trainer.compile and device.type != "cuda":
        raise ConfigError("trainer.compile=true is supported on CUDA only (inductor on the CPU needs a C++ "
                          "toolchain and minutes of compilation for no gain at these sizes); use trainer.compile=false")
    precision = resolve_precision(cfg.trainer.precision, device)
    cfg.trainer.precision = precision  # hashed and recorded as resolved: auto on a CPU and on a GPU differ
    return Runtime(device, precision, choose_threads(cfg.trainer.threads, launcher)), budget


def activate(runtime: Runtime) -> None:
    """Apply the runtime to this process: CPU threads, cuDNN autotuning."""
    if runtime.device.type == "cpu":
        torch.set_num_threads(runtime.threads)
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move the model to `device` in channels_last layout: faster convolutions with cuDNN and oneDNN."""
    return model.to(device=device, memory_format=torch.channels_last)
