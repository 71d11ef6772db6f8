"""Measurements in child processes (the peak RSS of a training run, the sweep's runs per hour)
and the description of the machine the bench ran on."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..runio import read_json

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TARGET_RSS_GIB = 2.0  # reported, never asserted


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
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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
