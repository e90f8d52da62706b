# make demo: set up, build the OpenMoji default, train, index, evaluate and open the app
# (make run: the same without the app).
# make test: set up and run the test suite.    make bench: run the benchmarks.
# Each target bootstraps .venv itself and skips the steps whose output already exists.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CM := $(VENV)/bin/crossmodal
STAMP := $(VENV)/.installed
RUN := runs/openmoji
RECIPE := configs/openmoji.yaml

.PHONY: run demo test bench lint clean

$(PY):
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@echo "installing crossmodal into $(VENV) (first time: several minutes)"
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

# One process does every step (build, train, index, evaluate; each skipped when done),
# so torch, transformers and the towers load once; make demo then serves in that process
# (crossmodal serve, the same as python app.py).
run: $(STAMP)
	@$(CM) prepare --config $(RECIPE)

demo: $(STAMP)
	@$(CM) serve --config $(RECIPE)

test: $(STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider

bench: run
	@mkdir -p runs/bench
	@$(PY) scripts/bench_search.py --json runs/bench/search.json
	@$(PY) scripts/bench_train.py --out runs/bench/train.json
	@$(PY) scripts/bench_engine.py --run $(RUN) --out runs/bench/engine.json

lint: $(STAMP)
	@$(VENV)/bin/ruff check crossmodal app.py scripts tests

clean:
	rm -rf runs data/built .cache
