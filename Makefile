# ct-ssl-hub: `make run` builds what it needs and serves the API + demo; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CTHUB := $(PY) -m cthub
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

.PHONY: venv run test bench study study-headct pretrain pretrain-extra evaluate experiments clean lint

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
	  --image-size 64 --epochs 4 --head-epochs 1 --max-train 4000 --backbone-lr-ratio 1 --max-test 5000 --seed 42

$(DEMO)/model.onnx: $(DEMO)/model.safetensors
	$(CTHUB) export $(DEMO)

run: $(DEMO)/model.onnx
	$(CTHUB) serve --model $(DEMO) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

# The four CPU-scale encoders from unlabeled OrganAMNIST (pretrain/recipes/cpu-organamnist.yaml): two at a
# time, 1 thread each, ~80-90 min of one core per method. Resumable: run it again after an interruption and
# every run continues from its last checkpoint; finished encoders are published to the local hub as
# <method>-organamnist-cpu (card: steps, minutes, weight change, kNN monitor, frozen-feature scores).
# Runs live outside the checkout ($(RUNS)), beside the hub, so a fresh clone finds and resumes them.
CTHUB_HOME ?= $(HOME)/.cache/ct-ssl-hub
RUNS ?= $(CTHUB_HOME)/runs
HUB_MODELS := $(CTHUB_HOME)/models
PRETRAIN_PAIRS ?= "spark byol" "mocov2 swav"
pretrain: $(STAMP) | $(ORGAN_NPZ)
	@mkdir -p $(RUNS)
	@for pair in $(PRETRAIN_PAIRS); do \
	  for m in $$pair; do \
	    $(CTHUB) pretrain --method $$m --data $(ORGAN_NPZ) --recipe cpu-organamnist --out $(RUNS)/$$m-cpu \
	      --resume --publish $$m-organamnist-cpu > $(RUNS)/$$m-cpu.log 2>&1 & \
	  done; wait; done
	$(CTHUB) pretrain-report $(RUNS)/spark-cpu $(RUNS)/byol-cpu $(RUNS)/mocov2-cpu $(RUNS)/swav-cpu --out docs/results

# Two questions of the CPU recipe, each at equal minutes of one core (see docs/results/README.md):
# SparK at 96 px (3x3 mask grid) vs 64 px (2x2), and BYOL continued from the SparK encoder (`--init`,
# hierarchical pretraining) vs BYOL from scratch over its first 300 steps (same schedule, same step cost).
pretrain-extra: $(STAMP) | $(ORGAN_NPZ)
	@mkdir -p $(RUNS)
	$(CTHUB) pretrain --method spark --data $(ORGAN_NPZ) --recipe cpu-organamnist --image-size 96 --steps 380 \
	  --max-minutes 86 --out $(RUNS)/spark96-cpu --resume --publish spark96-organamnist-cpu \
	  > $(RUNS)/spark96-cpu.log 2>&1 & \
	$(CTHUB) pretrain --method byol --data $(ORGAN_NPZ) --recipe cpu-organamnist --init spark-organamnist-cpu \
	  --steps 600 --max-minutes 45 --out $(RUNS)/byol-from-spark-cpu --resume \
	  --publish byol-from-spark-organamnist-cpu > $(RUNS)/byol-from-spark-cpu.log 2>&1 & wait
	$(CTHUB) pretrain-report $(RUNS)/spark-cpu $(RUNS)/byol-cpu $(RUNS)/mocov2-cpu $(RUNS)/swav-cpu \
	  $(RUNS)/spark96-cpu $(RUNS)/byol-from-spark-cpu --out docs/results

comma := ,
STUDY_ENCODERS ?= scratch,spark-organamnist-cpu,mocov2-organamnist-cpu,byol-organamnist-cpu,swav-organamnist-cpu
EVAL_ENCODERS ?= $(STUDY_ENCODERS),spark96-organamnist-cpu,byol-from-spark-organamnist-cpu

# Frozen-feature evaluation of every local encoder beside a random init (BN stored and recalibrated).
evaluate: $(STAMP) | $(ORGAN_NPZ)
	$(CTHUB) evaluate $(subst $(comma), ,$(EVAL_ENCODERS)) --data $(ORGAN_NPZ) --threads 1 \
	  --json docs/results/frozen-features.json

# The label-reduction study (paper Table 2 / Fig. 5) over the encoders that exist locally: the paper's recipe
# (head-only warm-up, then everything), one budget for every init with early stopping counted after
# unfreezing and selection on validation AUC, 3 seeds; resumable, independent cells in parallel at one thread
# each. Tables and the figure are copied to docs/results/study-organamnist/.
STUDY_FRACTIONS ?= 0.01,0.05
study: $(STAMP) | $(ORGAN_NPZ)
	$(CTHUB) study --data $(ORGAN_NPZ) --encoders $(STUDY_ENCODERS) --fractions $(STUDY_FRACTIONS) --seeds 3 \
	  --image-size 64 --epochs 60 --head-epochs 2 --patience 10 --select auc --max-val 1000 --max-test 3000 \
	  --workers 2 --threads 1 --out $(RUNS)/study-organamnist
	@mkdir -p docs/results/study-organamnist
	cp $(RUNS)/study-organamnist/*.md $(RUNS)/study-organamnist/*.csv $(RUNS)/study-organamnist/*.png \
	  docs/results/study-organamnist/

# Head CT hemorrhage (../shared/data/head_ct: 200 PNG slices, windowed by the dataset's authors; labels.csv):
# the paper's brain protocol, 5 stratified folds at 100% and 75% of each training part.
HEAD_CT ?= ../shared/data/head_ct
study-headct: $(STAMP)
	$(CTHUB) study --data $(HEAD_CT) --protocol kfold --folds 5 --encoders $(STUDY_ENCODERS) --fractions 1,0.75 \
	  --seeds 1 --image-size 64 --epochs 60 --head-epochs 2 --patience 10 --select auc --workers 2 --threads 1 \
	  --out $(RUNS)/study-headct
	@mkdir -p docs/results/study-headct
	cp $(RUNS)/study-headct/*.md $(RUNS)/study-headct/*.csv $(RUNS)/study-headct/*.png docs/results/study-headct/

# Everything the results in docs/results need, in order; every step resumes where it stopped.
experiments: pretrain evaluate study study-headct pretrain-extra

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf models .pytest_cache build *.egg-info
