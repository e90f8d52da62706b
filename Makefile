# make demo: set up, build the OpenMoji default, train, index, evaluate and open the app.
# make test: set up and run the test suite.    make bench: run the benchmarks.
# Each target bootstraps .venv itself and skips the steps whose output already exists.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CM := $(VENV)/bin/crossmodal
STAMP := $(VENV)/.installed
RUN := runs/openmoji

.PHONY: demo test bench lint clean

$(PY):
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@echo "installing crossmodal into $(VENV) (first time: several minutes)"
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: $(STAMP)
	@$(CM) build-data openmoji
	@$(CM) train --config configs/openmoji.yaml --if-missing
	@$(CM) index --run $(RUN) --if-missing
	@$(CM) eval --run $(RUN) --if-missing
	@$(PY) app.py --run $(RUN)

test: $(STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	@$(PY) scripts/bench_search.py --out docs/bench_search.json
	@$(PY) scripts/bench_train.py

lint: $(STAMP)
	@$(VENV)/bin/ruff check crossmodal app.py scripts tests

clean:
	rm -rf runs data/built .cache
