# make demo: set up, build the OpenMoji default, train, index, evaluate and open the app
# (make run: the same without the app).
# make test: set up and run the test suite.    make bench: run the benchmarks.
# Each target bootstraps .venv itself and skips the steps whose output already exists.
# .venv holds everything: the serving core (the base package) with the train, app and test
# extras. `pip install crossmodal` alone serves runs exported with `crossmodal export`.

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
	@$(PY) -m pip install -q -e '.[train,app,test]'
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

# the serving benchmark needs the run's exported encoders (int8 copies included)
bench: run
	@mkdir -p runs/bench
	@test -f $(RUN)/text_encoder.int8.onnx || $(CM) export --run $(RUN) --int8
	@$(PY) scripts/bench_search.py --json runs/bench/search.json
	@$(PY) scripts/bench_train.py --out runs/bench/train.json
	@$(PY) scripts/bench_engine.py --run $(RUN) --out runs/bench/engine.json
	@$(PY) scripts/bench_serving.py --run $(RUN) --int8 --out runs/bench/serving.json
	@$(PY) scripts/bench_ray_encode.py --run $(RUN) --out runs/bench/ray_encode.json
	@$(PY) scripts/bench_ray_encode.py --run $(RUN) --source parquet --out runs/bench/ray_encode_parquet.json

lint: $(STAMP)
	@$(VENV)/bin/ruff check crossmodal app.py scripts tests

clean:
	rm -rf runs data/built .cache
