# ddlab: every command a reader needs. Run `make help` for the list.
#
#   make reproduce [SCALE=quick|paper] [ONLY=01,02] [DEVICE=auto|cpu|cuda]
#   make test
#
# Every target first creates the project-local virtual environment .venv (once; it is
# rebuilt only when requirements.txt or pyproject.toml change).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
KERNEL := ddlab

SCALE  ?= quick
ONLY   ?=
DEVICE ?= auto
CONFIG ?=

# make test never touches the committed results/
TEST_RESULTS := $(CURDIR)/.pytest_results
# tests/nbval_tolerance.py: exact comparison on the machine that made the outputs, a numeric tolerance elsewhere
NBVAL_FLAGS  := --durations=12 --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider -p nbval_tolerance

.PHONY: help env reproduce readme test test-unit test-notebooks kernel lab notebooks bench clean distclean

help:
	@echo "make reproduce  run the notebooks with papermill (SCALE=quick|paper ONLY=01,02 DEVICE=auto), refresh README table"
	@echo "make test       unit tests, then every notebook through nbval (quick mode, CPU)"
	@echo "make lab        register the '$(KERNEL)' kernel and open JupyterLab on notebooks/"
	@echo "make notebooks  re-execute notebooks in quick mode on CPU and commit-ready write back (ONLY=...)"
	@echo "make bench      run the speed/memory benchmarks in benchmarks/"
	@echo "make kernel     register the '$(KERNEL)' Jupyter kernel inside .venv"
	@echo "make readme     regenerate the README results table from results/summary.csv"
	@echo "make env        create .venv (python3.11) and install requirements.txt + ddlib"
	@echo "make clean      remove caches (keeps results/ and .venv)"

# ----------------------------------------------------------------------------- environment

env: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@set -e; \
	if [ ! -x "$(PY)" ]; then \
	  boot="$$(command -v python3.11 || command -v python3 || true)"; \
	  if [ -z "$$boot" ]; then echo "error: need python3.11 (or python3 >= 3.10) on PATH" >&2; exit 1; fi; \
	  if ! "$$boot" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then \
	    echo "error: $$boot is Python $$("$$boot" -c 'import platform; print(platform.python_version())'); ddlab needs 3.10+ (3.11 recommended)" >&2; exit 1; \
	  fi; \
	  echo "creating $(VENV) with $$boot"; \
	  "$$boot" -m venv $(VENV); \
	fi
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $(STAMP)

# ----------------------------------------------------------------------------- running

# glibc malloc tuning for the long runs: keep freed memory in the process instead of handing large
# activations back to the kernel after every unrolled step (benchmarks/README.md, mtt_alloc: about a
# third less CPU time per MTT iteration on CPU, ~25% more peak memory; the math is unchanged).
# MALLOC_TUNING=0 runs with glibc's defaults. Not applied to `make bench`, which measures both.
MALLOC_TUNING ?= 1
ifeq ($(MALLOC_TUNING),1)
ALLOC_ENV := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 MALLOC_TOP_PAD_=268435456
endif

# The README table is refreshed even when a run failed (the others' results are new); the
# driver's exit status is kept.
reproduce: $(STAMP)
	@rc=0; \
	$(ALLOC_ENV) $(PY) -m ddlib.reproduce --scale "$(SCALE)" --only "$(ONLY)" --device "$(DEVICE)" --config "$(CONFIG)" || rc=$$?; \
	$(PY) -m ddlib.readme; \
	exit $$rc

readme: $(STAMP)
	$(PY) -m ddlib.readme

# Committed outputs are produced on CPU (CUDA hidden) so that CI's nbval recomputes the same numbers.
# CPU results depend (in the last bits, then visibly after hundreds of iterations) on the number of
# intra-op threads; committed outputs and nbval both use this many, whatever the machine has.
REFERENCE_THREADS := 2

notebooks: $(STAMP)
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=$(REFERENCE_THREADS) $(ALLOC_ENV) $(PY) -m ddlib.reproduce --scale quick --only "$(ONLY)" --write-back
	$(PY) -m ddlib.readme

# ----------------------------------------------------------------------------- testing

test: test-unit test-notebooks

test-unit: $(STAMP)
	rm -rf "$(TEST_RESULTS)"
	DDLIB_RESULTS="$(TEST_RESULTS)" $(PY) -m pytest --durations=12 tests

# Notebooks whose outputs have not been committed yet (`make notebooks ONLY=NN` at the reference
# thread count makes them): nbval would have nothing to compare. List them here until their outputs are in.
NBVAL_PENDING :=

# pytest exits 5 when it collects nothing; no notebooks yet is not a failure.
test-notebooks: $(STAMP)
	@if ! ls notebooks/[0-9][0-9]_*.ipynb >/dev/null 2>&1; then echo "no notebooks to check yet"; exit 0; fi; \
	set -x; rc=0; \
	CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=$(REFERENCE_THREADS) DDLIB_RESULTS="$(TEST_RESULTS)" PYTHONPATH=tests $(ALLOC_ENV) $(PY) -m pytest $(NBVAL_FLAGS) $(addprefix --ignore=,$(NBVAL_PENDING)) notebooks/ || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no notebook cells collected"; rc=0; fi; \
	exit $$rc

# ----------------------------------------------------------------------------- interactive

# --sys-prefix: the kernelspec lives inside .venv (share/jupyter/kernels/ddlab), so it is seen
# by this environment's JupyterLab, needs no write access outside the checkout, and goes away
# with the venv.
kernel: $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))"

# Jupyter refuses to run as root unless told to (containers, CI machines): pass it only then.
lab: kernel
	$(ALLOC_ENV) $(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS) $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: $(STAMP)
	@set -e; \
	if [ -f benchmarks/run.py ]; then $(PY) -m benchmarks.run; exit 0; fi; \
	found=0; \
	for f in benchmarks/*.py; do \
	  [ -e "$$f" ] || continue; case "$$(basename $$f)" in __init__.py|_*) continue;; esac; \
	  found=1; echo "== $$f"; $(PY) "$$f"; \
	done; \
	if [ $$found -eq 0 ]; then echo "no benchmarks yet (benchmarks/*.py)"; fi

# ----------------------------------------------------------------------------- housekeeping

clean:
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -prune -exec rm -rf {} +
	rm -rf .pytest_cache .pytest_results

distclean: clean
	rm -rf $(VENV)
