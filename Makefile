# fssmeta: `make test` and `make pipeline` are the two commands a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc-site-cache
export RAY_USAGE_STATS_ENABLED := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test test-unit test-infra lint pipeline data benchmark clean

setup: $(VENV)/.installed

# torch==2.13.0 goes in first: anything asking for plain `torch` before it is present pulls the newest
# CUDA build (several GB). Then the project with its dev extras, every version fixed by constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# The unit tier (tests/unit, no Ray / MLflow / DVC imported) and the integration tier (tests/integration).
test: setup lint
	$(BIN)/python -m pytest -q -m "not gpu" --durations=20 tests

test-unit: setup
	$(BIN)/python -m pytest -q

# shellcheck (Debian's package; .ci/run installs it) checks the infra/local scripts when present.
lint: setup
	$(BIN)/ruff check fssmeta tests benchmarks pipelines tools
	@if command -v shellcheck >/dev/null; then shellcheck -x infra/local/*.sh; \
	else echo "shellcheck not installed: infra/local/*.sh not checked (apt-get install shellcheck)"; fi

# infra/ alone: the `ray up` config against Ray's schema, the KubeRay / compose files, the scripts, and a
# 2-node Ray cluster + PostgreSQL-backed MLflow server with a training run on them (also part of `make test`).
test-infra: setup
	$(BIN)/python -m pytest -q -m integration tests/integration/test_infra.py

# The main job: every stage of dvc.yaml on params.yaml (the embedded defaults: synthetic data, local Ray,
# MLflow on a sqlite file). DVC runs `python -m pipelines.<stage>`, so the venv goes first on PATH.
pipeline: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show

benchmark: setup
	$(BIN)/python benchmarks/data.py

clean:
	rm -rf $(VENV) .pytest_cache .dvc-site-cache
