# Fresh machine with python3.11 and make: `make demo`, `make test`. uv is installed if missing.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
UV ?= $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")
PYTHON ?= python3.11
RUN := $(UV) run --frozen --python $(PYTHON)

.PHONY: help install demo test test-fast bench mlflow-ui clean-demo

help:
	@echo "make install   - uv sync --frozen (installs uv first if missing)"
	@echo "make demo      - the Wave workflow at toy scale on synthetic data, through dvc repro"
	@echo "make test      - the whole test suite"
	@echo "make bench     - benchmarks (bench/)"
	@echo "make mlflow-ui - MLflow UI on the project's store (127.0.0.1:5000)"

$(UV):
	$(PYTHON) -m pip install --user --quiet uv || $(PYTHON) -m pip install --quiet uv
	@test -x "$(UV)" || { echo "uv not found after install; put it on PATH or set UV=..."; exit 1; }

install: $(UV)
	$(UV) sync --frozen --python $(PYTHON)

demo: install
	cd pipelines/demo && $(RUN) dvc repro
	@cd pipelines/demo && $(RUN) dvc metrics show $(addprefix metrics/,train.json prune.json sparsify.json quantize.json score.json)
	@tail -n 8 pipelines/demo/metrics/score_layers.txt

test: install
	$(RUN) pytest -q

test-fast: install
	$(RUN) pytest -q -m "not e2e"

bench: install
	$(RUN) python bench/bench_count.py

mlflow-ui: install
	$(RUN) mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean-demo:
	rm -rf pipelines/demo/data pipelines/demo/models pipelines/demo/metrics
