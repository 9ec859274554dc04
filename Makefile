# ct-ssl-hub: `make run` builds what it needs and serves the API + demo; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CTHUB := $(VENV)/bin/cthub
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,serve,dev,tensorboard
export BENTOML_DO_NOT_TRACK := True
export GRADIO_ANALYTICS_ENABLED := False
export ORT_DISABLE_TELEMETRY := 1
export HF_HUB_DISABLE_TELEMETRY := 1

# Data: ../shared/data when present (CI, this team's machines), else the project's own MD5-checked fetch.
SHARED_NPZ := ../shared/data/organamnist.npz
ORGAN_NPZ := $(if $(wildcard $(SHARED_NPZ)),$(SHARED_NPZ),data/organamnist.npz)
DEMO := models/organamnist-demo
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: venv run test bench study pretrain clean lint

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: the local CPU wheel. Nothing after this may replace it with a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch was replaced')"
	@touch $@

data/organamnist.npz: | $(STAMP)
	$(CTHUB) data fetch organamnist --root data

# A short, bounded, honestly labeled fine-tune (see the model card it writes), then export.
$(DEMO)/model.safetensors: | $(STAMP) $(ORGAN_NPZ)
	$(CTHUB) finetune --data $(ORGAN_NPZ) --encoder scratch --out $(DEMO) \
	  --image-size 64 --epochs 4 --head-epochs 1 --max-train 4000 --seed 42

$(DEMO)/model.onnx: $(DEMO)/model.safetensors
	$(CTHUB) export $(DEMO)

run: $(DEMO)/model.onnx
	$(CTHUB) serve --model $(DEMO) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf models .pytest_cache build *.egg-info
