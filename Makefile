# Commands: `make demo` (the main job), `make test` (the suite) and `make test-fast` (the suite without the
# tests marked slow: trainings, kernel builds, CLI subprocesses). Each creates .venv
# when missing and reinstalls only when pyproject.toml or constraints.txt changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

# In this repository's checkout the datasets lie in ../shared/data; elsewhere vggkit downloads them.
ifneq ($(wildcard ../shared/data/fashion-mnist),)
export VGGKIT_DATA ?= $(abspath ../shared/data)
endif

.PHONY: demo test test-fast bench clean

demo: $(VENV)/.installed
	$(VENV)/bin/vggkit train --preset fast

test: $(VENV)/.installed-dev
	$(PY) -m pytest

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -m 'not slow'

# The speed benchmarks of BENCHMARKS.md, one after another (run alone: they time 2 busy cores).
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_speed.py --part headline --presets d2l,fast --runs 5
	$(PY) benchmarks/bench_fast.py --runs 3
	$(PY) benchmarks/bench_memory.py

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) build src/*.egg-info
