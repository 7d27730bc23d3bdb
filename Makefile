# `make test` and `make demo` work from a fresh clone on a machine with only python3 and make:
# the first run creates .venv and installs the package (editable) with the extras the tests need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv torch test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks]"
	touch $(STAMP)

venv: $(STAMP)

# Optional oracle for the PyTorch parity tests (they are skipped without it). On these machines
# `torch==2.13.0` resolves to a CPU wheel on local disk.
torch: $(STAMP)
	$(BIN)/python -m pip install --quiet torch==2.13.0 || echo "torch not installed: parity tests will be skipped"

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m minideeplab.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_layers.py

lint: $(STAMP)
	$(BIN)/ruff check minideeplab tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
