# VAE regularizer ablation suite. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUDY ?= main
RESULTS ?= $(or $(ABLATION_RESULTS),results)
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test faults report bench study-cpu study-cpu-seeds study-cpu-factorial study-cpu-bf16 clean gpu-prep gpu-dry-run study-pilot \
  study-5k study-5k-a study-5k-a-bf16 study-5k-b study-5k-c study-5k-d study-5k-e

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv if missing and install the project editable with its dev extras

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install ## Train regularizer=none,all (STUDY=main, RESULTS=dir, ARGS=extra overrides), then its report
	$(PY) -m ablation.train -m regularizer=none,all study=$(STUDY) results_dir=$(RESULTS) $(ARGS)
	$(PY) -m ablation.report $(RESULTS)/$(STUDY)

test: install ## Run the test suite, less the fault suite
	$(PY) -m pytest -q -m 'not faults' $(PYTEST_ARGS)

faults: install ## Run the fault suite (kills, corrupted archives, a full disk); prints the cases tried and held
	$(PY) -m pytest -q -m faults $(PYTEST_ARGS)

report: install ## Aggregate every study under results/ (or RESULTS=dir) into report.md/html
	$(PY) -m ablation.report $(RESULTS) $(ARGS)

bench: install ## Benchmark the training loop against the seed-style loop (results/bench/)
	$(PY) -m ablation.bench $(ARGS)

# The committed CPU study on real CIFAR-10 (results/cifar10-cpu/). Resumable: rerun to finish.
STUDY_DATA ?= $(or $(ABLATION_DATA),../shared/datasets/cifar10-jpg.tar.gz)
FACTORIAL_EPOCHS ?= 10
FACTORIAL_JOBS ?= 2

study-cpu: study-cpu-seeds study-cpu-factorial ## Both parts of the CPU study, then its reports

study-cpu-seeds: install ## Part 1: regularizer=none,all x seeds 0,1,2 at budget=cpu (~45 min on 2 cores)
	ABLATION_DATA=$(STUDY_DATA) $(PY) -m ablation.train -m regularizer=none,all seed=0,1,2 budget=cpu \
	  study=cifar10-cpu/none-vs-all results_dir=$(RESULTS)
	$(PY) -m ablation.report $(RESULTS)/cifar10-cpu/none-vs-all

study-cpu-factorial: install ## Part 2: the 32-run factorial, seed 0, width 32, 10k/2k images, 10 epochs
	ABLATION_DATA=$(STUDY_DATA) $(PY) -m ablation.train -m +sweep=factorial seed=0 budget=cpu \
	  data.train_size=10000 data.test_size=2000 trainer.epochs=$(FACTORIAL_EPOCHS) study=cifar10-cpu/factorial \
	  results_dir=$(RESULTS) hydra/launcher=joblib hydra.launcher.n_jobs=$(FACTORIAL_JOBS)
	$(PY) -m ablation.report $(RESULTS)/cifar10-cpu/factorial

study-cpu-bf16: install ## Part 1's none,all for seed 0 in bf16 (CPUs with bf16 instructions; ~10 min)
	ABLATION_DATA=$(STUDY_DATA) OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) -m ablation.train -m \
	  regularizer=none,all seed=0 budget=cpu trainer.precision=bf16 trainer.threads=2 study=cifar10-cpu/bf16-check \
	  results_dir=$(RESULTS)
	$(PY) -m ablation.report $(RESULTS)/cifar10-cpu/bf16-check

clean: ## Remove caches (keeps .venv and results)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

# The paper-scale study on a lent GPU machine (scripts/gpu_study.sh; docs/gpu.md).
GPU_DIR ?= .gpu

gpu-prep: install ## Fill .gpu/ with what the GPU machine lacks (pure-Python packages, the data archive)
	$(PY) scripts/gpu_prepare.py $(GPU_DIR) --data $(STUDY_DATA)

gpu-dry-run: install ## Run scripts/gpu_study.sh's steps on this CPU at budget=smoke
	GPU_STUDY_DRY=1 PYTHON=$(PY) OUT=$${OUT:-/tmp/gpu-out} GPU_STUDY_WORK=$${GPU_STUDY_WORK:-/tmp/gpu-work} \
	  ABLATION_DATA=$(STUDY_DATA) bash scripts/gpu_study.sh

# Part 0 of the study that can answer the seed (results/cifar10-pilot/): find the training-set size at which
# `none` overfits. none vs all, seed 0, width 32, fp32, 2,000 test and 500 validation images carved from the
# training set, each size trained long enough for none's validation recon to pass its minimum. Resumable.
PILOT = ABLATION_DATA=$(STUDY_DATA) $(PY) -m ablation.train -m regularizer=none,all seed=0 budget=cpu \
  trainer.precision=fp32 data.test_size=2000 data.val_size=500 study=cifar10-pilot results_dir=$(RESULTS) \
  'hydra.sweep.subdir=$${run_name}_n$${data.train_size}'

study-pilot: install ## Part 0: none vs all on 2k/5k/10k training images, long enough to overfit (~30 min)
	$(PILOT) data.train_size=2000 trainer.epochs=150
	$(PILOT) data.train_size=5000 trainer.epochs=120
	$(PILOT) data.train_size=10000 trainer.epochs=80
	$(PY) -m ablation.report $(RESULTS)/cifar10-pilot --no-wandb

# Parts A-E of the study that can answer the seed, in the regime the pilot chose (results/cifar10-5k/):
# 5,000 class-stratified training images of which 500 validate, 2,000 test images, width 32, 120 epochs.
# Each part is resumable: rerun its target to finish it, and finished runs are skipped.
# SEEDS_A / SEEDS_B / ... choose the seeds a piece runs, e.g. `make study-5k-a SEEDS_A=3,4`.
REGIME_5K = ABLATION_DATA=$(STUDY_DATA) $(PY) -m ablation.train -m budget=cpu data.train_size=5000 \
  data.val_size=500 data.test_size=2000 trainer.epochs=120 results_dir=$(RESULTS)
REPORT_5K = $(PY) -m ablation.report --no-wandb
SEEDS_A ?= 0,1,2,3,4
SEEDS_A_BF16 ?= 0,1,2
SEEDS_B ?= 0,1
SEEDS_C ?= 0,1,2
SEEDS_D ?= 0,1
SEEDS_E ?= 0,1,2
C_EPOCHS ?= 20

study-5k: study-5k-a study-5k-a-bf16 study-5k-b study-5k-c study-5k-d ## Parts A-D of the 5k-image study

study-5k-a: install ## Part A, the headline: none vs all, 5 seeds, fp32 (~75 min on 2 cores)
	$(REGIME_5K) regularizer=none,all seed=$(SEEDS_A) trainer.precision=fp32 study=cifar10-5k/a-none-vs-all
	$(REPORT_5K) $(RESULTS)/cifar10-5k/a-none-vs-all

study-5k-a-bf16: install ## Part A's first 3 seeds in bf16, for the bf16-vs-fp32 equivalence test
	$(REGIME_5K) regularizer=none,all seed=$(SEEDS_A_BF16) trainer.precision=bf16 study=cifar10-5k/a-bf16
	$(PY) -m ablation.equivalence $(RESULTS)/cifar10-5k/a-none-vs-all $(RESULTS)/cifar10-5k/a-bf16

study-5k-b: install ## Part B: the 2^(5-1) half factorial, 2 seeds (~4 h on 2 cores)
	$(REGIME_5K) +sweep=half_factorial seed=$(SEEDS_B) trainer.precision=fp32 study=cifar10-5k/b-half-factorial
	$(REPORT_5K) $(RESULTS)/cifar10-5k/b-half-factorial

study-5k-c: install ## Part C: lr 1e-3..3e-2 x none/all/only_batchnorm/only_dropout x 3 seeds, short runs
	$(REGIME_5K) +sweep=lr_stability seed=$(SEEDS_C) trainer.epochs=$(C_EPOCHS) trainer.precision=fp32 study=cifar10-5k/c-lr-stability
	$(REPORT_5K) $(RESULTS)/cifar10-5k/c-lr-stability

study-5k-d: install ## Part D: dose-response of beta and dropout from none, 2 seeds
	$(REGIME_5K) +sweep=dose_beta seed=$(SEEDS_D) trainer.precision=fp32 study=cifar10-5k/d-dose
	$(REGIME_5K) +sweep=dose_dropout seed=$(SEEDS_D) trainer.precision=fp32 study=cifar10-5k/d-dose
	$(REPORT_5K) $(RESULTS)/cifar10-5k/d-dose

study-5k-e: install ## Part E: the seed's width 128, none vs all, 3 seeds (hours on a CPU; a GPU suits it)
	$(REGIME_5K) regularizer=none,all seed=$(SEEDS_E) budget.width=128 trainer.precision=fp32 study=cifar10-5k/e-width128
	$(REPORT_5K) $(RESULTS)/cifar10-5k/e-width128
