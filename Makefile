# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.13.0 fbgemm-gpu-cpu==1.8.0
TORCHREC_PIN := torchrec==1.8.0
DEMO_CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: venv demo test lint clean-data

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet --no-deps $(TORCHREC_PIN)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m din_torchrec.cli demo --config $(DEMO_CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check din_torchrec tests launch benchmarks
	$(BIN)/ruff format --check din_torchrec tests launch benchmarks

clean-data:
	rm -rf data runs
