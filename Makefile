# Fresh machine with python3.11 and make: `make demo`, `make test`. uv is installed if missing.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
UV ?= $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")
PYTHON ?= python3.11
RUN := $(UV) run --frozen --python $(PYTHON)
PIPELINE ?= demo
DATA ?= synthetic
PIPELINE_DIR := pipelines/$(PIPELINE)
MLFLOW_PORT ?= 5000
DEVICE ?= cuda
# Threads torch uses in each stage of `make demo`, exported as OMP_NUM_THREADS and printed at its start: 2, or the
# OMP_NUM_THREADS already in the environment (a test worker's share of the cores); the README's timings say at how many.
THREADS ?= $(or $(OMP_NUM_THREADS),2)
# DVC's experiment runner restores every output before the first stage (allow_missing) and warns once for each one no
# run has made yet ("No file hash info found for '.../models/train.pt'. It won't be created."): expected on a first
# run, so make demo drops exactly that line; every other DVC message passes.
DVC_NO_HASH_WARNING := "^WARNING: No file hash info found for '.*'. It won't be created.$$"
# `make exp-show`: what each run scored (the score stage's headline metrics), the pruning rate it reached (prune.rate
# is only what it asked for) and the params that differ between runs; every other metric, and the deps' hashes, are
# dropped (DVC matches these regexes from the column name's start).
EXP_HEADLINE := accuracy|params|flops|score|qualifies|reached_rate
EXP_DROP := (?!.*\.)(?!(Experiment|Created|$(EXP_HEADLINE))$$).*|.*[:/].*

.PHONY: help install demo exp-show test test-fast bench gpu-check report screenshots mlflow-ui clean-demo

help:
	@echo "make install                 - uv sync --frozen (installs uv first if missing)"
	@echo "make demo [PIPELINE=name]    - a pipeline at toy scale on synthetic data through DVC (default: demo = Wave);"
	@echo "                               names: $$(ls -d pipelines/*/dvc.yaml | cut -d/ -f2 | tr '\n' ' ')"
	@echo "make demo THREADS=n ...      - the same at n torch threads (default: \$$OMP_NUM_THREADS if set, else 2)"
	@echo "make demo DATA=digits ...    - the same toy run on real images (scikit-learn's digits, 10 classes):"
	@echo "                               $$(ls pipelines/*/digits.yaml | cut -d/ -f2 | tr '\n' ' ')"
	@echo "make exp-show [PIPELINE=...] - the pipeline's DVC experiments, key columns only"
	@echo "make test                    - the whole test suite"
	@echo "make bench                   - benchmarks (bench/)"
	@echo "make gpu-check [DEVICE=cpu]  - every CUDA path on one GPU in < 8 min: pipelines, speed table, checks"
	@echo "                               (reports/gpu-check/); DEVICE=cpu: the same at tiny sizes"
	@echo "make report                  - accuracy-vs-score report of every pipeline run in MLflow (reports/)"
	@echo "make mlflow-ui               - MLflow UI on the project's store"

$(UV):
	$(PYTHON) -m pip install --user --quiet uv || $(PYTHON) -m pip install --quiet uv
	@test -x "$(UV)" || { echo "uv not found after install; put it on PATH or set UV=..."; exit 1; }

install: $(UV)
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)

# A pipeline's toy.yaml (if any) is applied to its params.yaml (then, with DATA=digits, its digits.yaml: the same
# toy run on real images), then the pipeline runs as a DVC experiment, so it is the baseline later
# `dvc exp run -S ...` experiments are compared with (`git checkout params.yaml` = full scale).
# A pipeline that starts from a released checkpoint (an `import` section) gets a random file in its place first.
# It ends with one short table read from the score stage's metrics/score.json (`micronet summary`), the per-layer
# count's totals, and where the curves are; every stage's metrics: `cd $(PIPELINE_DIR) && uv run dvc metrics show`.
demo: export OMP_NUM_THREADS := $(THREADS)
demo: install
	@echo "make demo: pipeline $(PIPELINE_DIR), data $(DATA), OMP_NUM_THREADS=$(THREADS) (make demo THREADS=n to change)"
	@test -f $(PIPELINE_DIR)/dvc.yaml || { echo "no pipeline $(PIPELINE_DIR)/dvc.yaml"; exit 2; }
	@test "$(DATA)" = synthetic || test -f $(PIPELINE_DIR)/$(DATA).yaml || { echo "no $(PIPELINE_DIR)/$(DATA).yaml: \
		DATA=digits is for $$(ls pipelines/*/digits.yaml | cut -d/ -f2 | tr '\n' ' ')"; exit 2; }
	cd $(PIPELINE_DIR) && { test ! -f toy.yaml || $(RUN) micronet params apply toy.yaml; } \
		&& { test "$(DATA)" = synthetic || $(RUN) micronet params apply $(DATA).yaml; } \
		&& { ! grep -q '^import:' params.yaml || $(RUN) micronet data synth-kaist --params params.yaml; } \
		&& { set -o pipefail; $(RUN) dvc exp run 2>&1 | { grep --line-buffered -v $(DVC_NO_HASH_WARNING) || true; }; }
	@cd $(PIPELINE_DIR) && tail -n 8 metrics/score_layers.txt && echo && $(RUN) micronet summary --pipeline $(PIPELINE) \
		&& echo "curves: a PNG per stage in each MLflow stage run (make mlflow-ui); offline: make report, or" \
		"cd $(PIPELINE_DIR) && uv run dvc plots show (its HTML loads vega from a CDN)"

exp-show: install
	@cd $(PIPELINE_DIR) && COLUMNS=$${COLUMNS:-160} $(RUN) dvc exp show --no-pager --only-changed --precision 4 \
		--drop '$(EXP_DROP)' --keep '($(EXP_HEADLINE))$$'

# One pytest worker per core, the whole-pipeline runs first (tests/conftest.py), load balanced as workers free up.
test: install
	$(RUN) pytest -q -n auto --dist worksteal --durations=12

test-fast: install
	$(RUN) pytest -q -m "not e2e"

bench: install
	$(RUN) python bench/bench_count.py
	$(RUN) python bench/bench_cli.py
	$(RUN) python bench/bench_gpu_ops.py
	$(RUN) python bench/bench_loader.py
	$(RUN) python bench/bench_train.py

# Quiet install: without CUDA the check answers in one line (exit 2); the tables go to reports/gpu-check/.
gpu-check: $(UV)
	@$(UV) sync --frozen --compile-bytecode --quiet --python $(PYTHON)
	@$(RUN) python bench/gpu_check.py --device $(DEVICE) $(GPU_CHECK_ARGS)

screenshots: install
	$(RUN) python bench/screenshots.py

report: install
	$(RUN) micronet report --output reports --mlflow-url http://127.0.0.1:$(MLFLOW_PORT)

mlflow-ui: install
	@$(RUN) micronet views --port $(MLFLOW_PORT)
	$(RUN) mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root file://$(CURDIR)/mlartifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

clean-demo:
	rm -rf $(PIPELINE_DIR)/data $(PIPELINE_DIR)/models $(PIPELINE_DIR)/metrics $(PIPELINE_DIR)/dvc.lock
