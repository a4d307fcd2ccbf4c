# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: setup demo test lint browser clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU wheel where pip finds it locally (README: elsewhere, PyTorch's
# CPU index); the project then asks for a range that 2.13.0 satisfies, so pip installs nothing
# bigger. Its dependencies at the versions the worker images install (docker/constraints.txt):
# the tests run what the workers run.
$(VENV)/.installed: pyproject.toml docker/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --constraint docker/constraints.txt -e '.[test]'
	touch $@

# The main job on the embedded ISBI 2012 sample: `deepem3d demo`, one run of the pipeline file
# shipped in the package (deepem3d/pipelines/isbi2012-demo.yaml): the sample's layers,
# affinities from the shipped default weights, the segmentation (the settings the model
# records), mip levels, meshes and skeletons, scores on sections 20..29, $(DEMO)/report.json and
# $(DEMO)/demo.png; two local worker processes drain the stages.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/deepem3d demo $(DEMO)

# Debian's chromium for the Neuroglancer browser test (skipped, with its reason, without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

lint: setup
	$(BIN)/ruff check .

# Two pytest processes (pytest-xdist), each taking whole test files (module fixtures are made
# once): one process keeps 0.96 of this 2-core machine's cores busy on average, and the suite
# took 27.3 min in one process, 17.0 min in two (607 tests; 19.8 min in two at 636 tests, a
# clean-clone CI run, 2026-12-07). PYTEST_WORKERS=0: one.
PYTEST_WORKERS ?= 2
test: setup browser lint
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
