# VAE regularizer ablation suite. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUDY ?= main
RESULTS ?= $(or $(ABLATION_RESULTS),results)
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test report bench study-cpu clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv if missing and install the project editable with its dev extras

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install ## Train regularizer=none,all (STUDY=main, ARGS=extra overrides), then write its report
	$(PY) -m ablation.train -m regularizer=none,all study=$(STUDY) $(ARGS)
	$(PY) -m ablation.analysis $(RESULTS)/$(STUDY)

test: install ## Run the test suite
	$(PY) -m pytest -q $(PYTEST_ARGS)

report: install ## Aggregate every study under results/ (or RESULTS=dir) into report.md/html
	$(PY) -m ablation.analysis $(RESULTS) $(ARGS)

bench: install ## Benchmark the training loop against the seed-style loop (results/bench/)
	$(PY) -m ablation.bench $(ARGS)

clean: ## Remove caches (keeps .venv and results)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
