# `make test` and `make demo` work from a fresh clone on a machine with only python3 and make:
# the first run creates .venv and installs the package (editable) with the extras the tests need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv torch test demo bench lint docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks,docs]"
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

# The website, into build/site: docs/, the notebooks executed, the API pages, the source pages (docs/website.md).
# Strict: a broken link, a page or notebook missing from the nav, or a cell error fails it. Quick-mode notebooks by
# default; `make docs MINIDEEPLAB_SHORT=0` executes them in full mode. The notebooks run with one BLAS/OpenMP thread
# unless OMP_NUM_THREADS says otherwise: on a busy 2-core machine notebook 06 took 55-64 s with one thread and
# 280-311 s with two (interleaved runs, docs/website.md).
MINIDEEPLAB_SHORT ?= 1
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 MINIDEEPLAB_SHORT=$(MINIDEEPLAB_SHORT) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python -m mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check minideeplab tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
