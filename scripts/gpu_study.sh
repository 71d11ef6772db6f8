#!/usr/bin/env bash
# The paper-scale study on one lent GPU machine, in one call of at most 10 minutes.
#
#   make gpu-prep                          # here: fill .gpu/ with the packages the GPU image lacks + the data
#   bash scripts/gpu_study.sh              # there, from the repository root, carrying .gpu (device tool)
#   GPU_STUDY_DRY=1 bash scripts/gpu_study.sh   # the same steps on this CPU at budget=smoke (tests run it)
#
# Steps: check the environment; a 1-epoch paper smoke; the bench on CUDA (no RSS run); the study
# `regularizer=none,all seed=0,1,2 budget=paper logger=none` until the deadline; its report; then
# everything but checkpoints and models (*.pt) packed into $OUT/gpu-results.tar.gz.
# A run that would not finish before the deadline does not start, and one still training at the
# deadline stops between epochs with a checkpoint: rerunning the script resumes the study.
#
# Environment: OUT (where the archive goes; default ./gpu-out), PYTHON (default python3),
# GPU_STUDY_SECONDS (the study's deadline from the script's start; default 480), GPU_CARRY (.gpu),
# ABLATION_DATA (default: the archive in $GPU_CARRY), GPU_STUDY_WORK (results folder to resume in),
# GPU_STUDY_JOBS (runs trained at once on the one GPU, through the joblib launcher; default 3).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
CARRY=${GPU_CARRY:-.gpu}
DRY=${GPU_STUDY_DRY:-0}
start=$(date +%s)
export ABLATION_DEADLINE=$((start + ${GPU_STUDY_SECONDS:-480}))
mkdir -p "$OUT"

if [ -d "$CARRY/site" ]; then
  export PYTHONPATH="$PWD/$CARRY/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
data=${ABLATION_DATA:-$(ls "$CARRY"/*.tar.gz 2>/dev/null | head -n 1 || true)}
if [ -z "$data" ] || [ ! -e "$data" ]; then
  echo "gpu_study: no data: run 'make gpu-prep' here and carry $CARRY, or set ABLATION_DATA" >&2
  exit 2
fi
work=${GPU_STUDY_WORK:-$PWD/gpu-work}
export ABLATION_DATA=$data ABLATION_RESULTS=$work/results ABLATION_CACHE=$work/cache WANDB_MODE=disabled
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  device=cpu budget=smoke seeds=0
  extra=(eval.sample_images=64 eval.iw_images=32 eval.iw_samples=4 eval.classifier_epochs=1)
  bench=(--tiny --no-rss --device cpu)
else
  device=cuda budget=paper seeds=0,1,2
  extra=()
  bench=(--device cuda --no-rss --images 20480 --repeats 3)
fi
study=cifar10-paper
jobs=${GPU_STUDY_JOBS:-3}

echo "== environment"
GPU_STUDY_DEVICE=$device "$PY" - <<'PY'
import os, platform, sys
import torch, hydra, omegaconf
print(f"python {platform.python_version()}, torch {torch.__version__}, hydra {hydra.__version__}, "
      f"omegaconf {omegaconf.__version__}")
if os.environ["GPU_STUDY_DEVICE"] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_study: CUDA is not available on this machine")
    print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
PY

echo "== 1-epoch $budget smoke"
"$PY" -m ablation.train budget=$budget trainer.epochs=1 trainer.device=$device logger=none study=gpu-smoke "${extra[@]}"

echo "== bench"
"$PY" -m ablation.bench "${bench[@]}" --out "$work/bench/bench.json"

echo "== study until $(date -d @"$ABLATION_DEADLINE" +%T 2>/dev/null || echo "$ABLATION_DEADLINE")"
status=0
"$PY" -m ablation.train -m regularizer=none,all seed=$seeds budget=$budget trainer.device=$device logger=none \
  study=$study hydra/launcher=joblib hydra.launcher.n_jobs=$jobs "${extra[@]}" || status=$?
"$PY" -m ablation.report "$ABLATION_RESULTS/$study" --no-wandb || status=$?

"$PY" - "$work" "$OUT/gpu-results.tar.gz" <<'PY'
import sys, tarfile
from pathlib import Path
work, dest = Path(sys.argv[1]), sys.argv[2]
with tarfile.open(dest, "w:gz") as tar:
    for part in ("results", "bench"):
        for path in sorted((work / part).rglob("*")):
            if path.is_file() and path.suffix != ".pt" and "cache" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(work)))
print(f"packed {dest}")
PY
echo "gpu_study: done in $(( $(date +%s) - start )) s (study exit status $status)"
exit $status
