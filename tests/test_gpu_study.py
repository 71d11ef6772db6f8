"""scripts/gpu_study.sh, the paper-scale study for a lent GPU, dry-run on this CPU; and what it carries."""
from __future__ import annotations

import subprocess
import sys
import tarfile

from conftest import ROOT


def test_the_dry_run_packs_reports_and_no_checkpoints(env, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_study.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env | {"GPU_STUDY_DRY": "1", "PYTHON": sys.executable, "OUT": str(out),
                                     "GPU_STUDY_WORK": str(tmp_path / "work"), "GPU_CARRY": str(tmp_path / "none")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("== environment", "== 1-epoch smoke smoke", "== bench", "== study until", "packed"):
        assert step in proc.stdout, step
    with tarfile.open(out / "gpu-results.tar.gz") as tar:
        names = set(tar.getnames())
    study = "results/cifar10-paper"
    for name in ("report.md", "report.html", "runs.csv", "history.csv"):
        assert f"{study}/{name}" in names, name
    for run in ("none_seed0", "wd-do-bn-beta-aug_seed0"):
        assert f"{study}/{run}/metrics.json" in names and f"{study}/{run}/history.csv" in names
    assert "bench/bench.json" in names and "bench/bench.md" in names
    assert not [n for n in names if n.endswith(".pt")], "no checkpoints or models travel back"


def test_the_carried_folder_holds_the_missing_packages_well_inside_the_travel_limit(tmp_path):
    carry = tmp_path / "gpu"
    subprocess.run([sys.executable, "scripts/gpu_prepare.py", str(carry)], cwd=ROOT, check=True, capture_output=True)
    for package in ("hydra", "omegaconf", "antlr4", "hydra_plugins/hydra_joblib_launcher", "pytorch_msssim"):
        assert (carry / "site" / package).is_dir(), package
    assert not list(carry.rglob("*.so")), "pure Python only: the GPU machine's Python is another version"
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    assert size < 8 * 2**20, f"{size / 2**20:.1f} MiB without the data (19 MiB archive); the limit is 64 MiB"
