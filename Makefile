# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: setup demo test lint browser clean

setup: $(VENV)/.installed

# torch first, pinned: it is the CPU wheel on this disk; the project then asks for a range
# that 2.13.0 satisfies, so pip installs nothing bigger.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The main job on the embedded ISBI 2012 sample: write the layers, predict affinities with the
# shipped default weights, segment them (in-plane smoothing, mean-affinity agglomeration, dust
# merged), score sections 20..29
# against the ground truth, and add mip levels; every stage is queue tasks drained from a file
# queue by two local worker processes.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/deepem3d sample $(DEMO)
	$(BIN)/deepem3d infer $(DEMO)/image $(DEMO)/affinity --queue fq://$(DEMO)/queue --parallel 2
	$(BIN)/deepem3d segment $(DEMO)/affinity $(DEMO)/segmentation --method mean --threshold 0.55 \
	  --sigma 4 --dust-size 200 --queue fq://$(DEMO)/queue --parallel 2
	$(BIN)/deepem3d evaluate $(DEMO)/segmentation $(DEMO)/ground_truth --bounds 0,0,20,512,512,30
	$(BIN)/deepem3d downsample $(DEMO)/image --queue fq://$(DEMO)/queue --parallel 2
	$(BIN)/deepem3d downsample $(DEMO)/segmentation --queue fq://$(DEMO)/queue --parallel 2
	$(BIN)/deepem3d status fq://$(DEMO)/queue
	@echo "done: layers in $(DEMO)/; look at them with:"
	@echo "  $(BIN)/deepem3d view $(DEMO)/image $(DEMO)/affinity $(DEMO)/segmentation $(DEMO)/ground_truth"

# Debian's chromium for the Neuroglancer browser test (skipped, with its reason, without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

lint: setup
	$(BIN)/ruff check .

test: setup browser lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
