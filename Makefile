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
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: venv run test bench study study-organamnist study-figure5 study-headct study-headct-hires study-headct-224 study-siim pretrain-realct pretrain pretrain-extra evaluate experiments clean lint replicate

venv: $(STAMP)
# One build at a time (flock, where the system has it): two `make` commands started together on a fresh clone,
# such as study cells run side by side, would otherwise both build the venv and break each other's pip. The
# second waits for the first, then finds the stamp current and does nothing.
$(STAMP): pyproject.toml
	@if command -v flock >/dev/null; then exec 9>.venv.lock && flock 9; fi && \
	if [ -f $@ ] && [ $@ -nt pyproject.toml ]; then echo "venv: built meanwhile by another make"; exit 0; fi && \
	{ test -x $(PY) || $(PYTHON) -m venv $(VENV); } && \
	set -x && $(PY) -m pip install -q --upgrade pip && \
	: "torch first, pinned: the local CPU wheel. Nothing after this may replace it with a CUDA build." && \
	$(PY) -m pip install -q torch==2.13.0 && \
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" && \
	$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch was replaced')" && \
	touch $@

data/organamnist.npz: | $(STAMP)
	$(CTHUB) data fetch organamnist --root data

# The main job: the best `make pretrain` SparK/MoCo/BYOL/SwAV encoder in the local hub, else a short SparK run
# (~10 min), fine-tuned on 1% of the labels beside a random-init baseline (the comparison lands in the
# served model's card), ONNX fp32 + int8, then the API and the demo on $(HOST):$(PORT). Every step is
# reused when current: a second `make run` starts serving in seconds. BUDGET=tiny: the same path in ~1 min.
# TASK=head-ct: the 224 px head CT hemorrhage classifier from $(HEAD_CT) (brain window on DICOM input), served
# beside the OrganAMNIST one when that was made before (the demo's picker offers both; `model=` selects one).
BUDGET ?= quick
MODELS ?= models
TASK ?= organamnist
RUN_DATA = $(if $(filter organamnist,$(TASK)),$(ORGAN_NPZ),$(HEAD_CT))
run: $(STAMP) | $(if $(filter organamnist,$(TASK)),$(ORGAN_NPZ))
	$(CTHUB) quickstart --data $(RUN_DATA) --task $(TASK) --budget $(BUDGET) --models $(MODELS) --serve --host $(HOST) --port $(PORT)

# The test files run on $(TEST_WORKERS) pytest-xdist workers (a file's tests stay on one worker, so module
# fixtures such as a trained classifier or a started server are built once).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The CPU-scale encoders from unlabeled OrganAMNIST, two runs at a time at 1 thread each, budgets in steps
# (~80-90 min of one core per method on the AVX2-only EPYC, 20-75 min on one with AVX512-BF16):
# 1. SparK and BYOL (pretrain/recipes/cpu-organamnist.yaml);
# 2. MoCo v2 and SwAV continued from that SparK encoder (cpu-organamnist-from-spark.yaml, ~20 min each on the
#    bf16 machine): with 1, the recipe's four encoders that beat random init by >= 0.03 AUC at 1% labels;
# 3. MoCo v2 and SwAV from scratch (cpu-organamnist.yaml), which stay short of that (docs/results/README.md).
# Resumable: run it again after an interruption and every run continues from its last checkpoint; finished
# encoders are published to the local hub (card: steps, minutes, weight change, kNN monitor, frozen-feature
# scores, parent); one the hub already holds with the same weights is left as it is, with the study rows its
# card gained. Runs live outside the checkout ($(RUNS)), beside the hub, so a fresh clone finds them.
CTHUB_HOME ?= $(HOME)/.cache/ct-ssl-hub
RUNS ?= $(CTHUB_HOME)/runs
HUB_MODELS := $(CTHUB_HOME)/models
# $(call pretrain_run,method,recipe,run folder,published name[,more flags]): one resumable run, logged beside
# its folder; $(call side_by_side,command,command): both at once, failing (after both end) if either failed.
pretrain_run = $(CTHUB) pretrain --method $(1) --data $(ORGAN_NPZ) --recipe $(2) $(5) --out $(RUNS)/$(3) --resume \
  --publish $(4) > $(RUNS)/$(3).log 2>&1
side_by_side = { $(1); } & a=$$!; { $(2); } & b=$$!; wait $$a; ra=$$?; wait $$b; rb=$$?; \
  [ $$ra -eq 0 ] && [ $$rb -eq 0 ] || { echo "a run failed: see the log its command names"; exit 1; }
pretrain: $(STAMP) | $(ORGAN_NPZ)
	@mkdir -p $(RUNS)
	$(call side_by_side,$(call pretrain_run,spark,cpu-organamnist,spark-cpu,spark-organamnist-cpu),\
	  $(call pretrain_run,byol,cpu-organamnist,byol-cpu,byol-organamnist-cpu))
	$(call side_by_side,\
	  $(call pretrain_run,mocov2,cpu-organamnist-from-spark,mocov2-from-spark-cpu,mocov2-from-spark-organamnist-cpu),\
	  $(call pretrain_run,swav,cpu-organamnist-from-spark,swav-from-spark-lr1-cpu,swav-from-spark-lr1-organamnist-cpu))
	$(call side_by_side,$(call pretrain_run,mocov2,cpu-organamnist,mocov2-cpu,mocov2-organamnist-cpu),\
	  $(call pretrain_run,swav,cpu-organamnist,swav-cpu,swav-organamnist-cpu))
	$(CTHUB) pretrain-report $(RUNS)/spark-cpu $(RUNS)/byol-cpu $(RUNS)/mocov2-cpu $(RUNS)/swav-cpu \
	  $(RUNS)/mocov2-from-spark-cpu $(RUNS)/swav-from-spark-lr1-cpu --out docs/results

# Questions of the CPU recipe, each at equal work (see docs/results/README.md): SparK at 96 px (3x3 mask grid)
# vs 64 px (2x2), and BYOL continued from the SparK encoder (hierarchical pretraining) vs BYOL from scratch: the
# same 600 steps, schedule and step cost (380 steps at 96 px cost what 850 do at 64 px). Then MoCo v2 with LARS
# instead of SGD (the SGD run moved conv1 by 600% and layer4 by 2.6%; LARS scales each layer's step to its
# norm, as for BYOL and SwAV here and MoCo v3's ResNet recipe): same 1,400 steps; beside it SwAV from SparK at
# the fresh run's LARS 4.0 per 256 (it moved SparK's weights 21% and lost much of its features: the recipe
# uses 1.0). Last, SwAV for 1,500 steps from scratch (the recipe's 480 fill 80 min of the AVX2 machine; 1,500
# fill ~60 min of a bf16 one). Budgets are the steps; --max-minutes is only a cap for a contended machine.
pretrain-extra: $(STAMP) | $(ORGAN_NPZ)
	@mkdir -p $(RUNS)
	$(call side_by_side,\
	  $(call pretrain_run,spark,cpu-organamnist,spark96-cpu,spark96-organamnist-cpu,--image-size 96 --steps 380 --max-minutes 120),\
	  $(call pretrain_run,byol,cpu-organamnist-from-spark,byol-from-spark-cpu,byol-from-spark-organamnist-cpu))
	$(call side_by_side,\
	  $(call pretrain_run,mocov2,cpu-organamnist,mocov2-lars-cpu,mocov2-lars-organamnist-cpu,--optimizer lars --lr 4.0 --weight-decay 1.5e-6 --steps 1400 --max-minutes 120),\
	  $(call pretrain_run,swav,cpu-organamnist,swav-from-spark-cpu,swav-from-spark-organamnist-cpu,--init spark-organamnist-cpu --steps 480 --max-minutes 120))
	$(call pretrain_run,swav,cpu-organamnist,swav1500-cpu,swav1500-organamnist-cpu,--steps 1500 --max-minutes 100)
	$(CTHUB) pretrain-report $(RUNS)/spark-cpu $(RUNS)/byol-cpu $(RUNS)/mocov2-cpu $(RUNS)/swav-cpu \
	  $(RUNS)/mocov2-from-spark-cpu $(RUNS)/swav-from-spark-lr1-cpu $(RUNS)/spark96-cpu $(RUNS)/byol-from-spark-cpu \
	  $(RUNS)/mocov2-lars-cpu $(RUNS)/swav-from-spark-cpu $(RUNS)/swav1500-cpu --out docs/results

comma := ,
# The encoders of `make pretrain`, and of `make pretrain-extra`.
PRETRAIN_ENCODERS := spark-organamnist-cpu,mocov2-organamnist-cpu,byol-organamnist-cpu,swav-organamnist-cpu
PRETRAIN_ENCODERS := $(PRETRAIN_ENCODERS),mocov2-from-spark-organamnist-cpu,swav-from-spark-lr1-organamnist-cpu
STUDY_ENCODERS ?= scratch,$(PRETRAIN_ENCODERS)
EXTRA_ENCODERS := spark96-organamnist-cpu,byol-from-spark-organamnist-cpu,mocov2-lars-organamnist-cpu
EXTRA_ENCODERS := $(EXTRA_ENCODERS),swav-from-spark-organamnist-cpu,swav1500-organamnist-cpu
EVAL_ENCODERS ?= $(STUDY_ENCODERS),$(EXTRA_ENCODERS)

# Frozen-feature evaluation of every local encoder beside a random init (BN stored and recalibrated).
evaluate: $(STAMP) | $(ORGAN_NPZ)
	$(CTHUB) evaluate $(subst $(comma), ,$(EVAL_ENCODERS)) --data $(ORGAN_NPZ) --threads 1 \
	  --json docs/results/frozen-features.json

# The label-reduction study (paper Table 2 / Fig. 5) over the encoders that exist locally and scratch: the
# paper's recipe (head-only warm-up, then everything), one budget for every init with early stopping counted
# after unfreezing and selection on validation AUC, 3 seeds, OrganAMNIST label fractions 1/5/10/25/100 % and
# the head CT set (5-fold at 100 and 75 %); resumable, independent cells in parallel at one thread each,
# smallest fraction first. The study folders live in the repo (small JSON per finished cell, tables, figure),
# so a finished cell is never run again on another machine; each cell records the sha256 of the encoder it
# measured. CPU scale: a 1% cell takes ~10-20 min of one core, a 100% cell about a day; the whole design is
# weeks of one core, accumulated session by session (a cell interrupted part-way continues from the checkpoint
# it writes every 5 minutes under $(CTHUB_HOME)/runs/study-cells) (`make study-organamnist STUDY_FRACTIONS=0.01,0.05` for
# the part that decides).
# The budget is 200 epochs: at 60, random init was still improving at 1% labels (best epoch = last in all 3
# seeds) while every SSL init had stopped early; at 120 one random-init seed picked epoch 118, and at 200 it
# stopped at 128 with the same epoch 118 (converged). Raising the budget reruns (continues) only the cells
# that used their whole budget (`finetune.study.same_run_within`); every finished cell stopped early.
STUDY_FRACTIONS ?= 0.01,0.05,0.1,0.25,1
STUDY_EPOCHS ?= 200
# Fewer seeds run the first seeds' cells only (e.g. STUDY_SEEDS=1 for a first pass at 10-100%). The reports
# cover the folder's whole grid (every encoder, fraction and seed asked for so far, kept in its study.json), so a
# run over a subset (STUDY_ENCODERS=one-new-encoder, STUDY_FRACTIONS=0.1) adds rows rather than replacing them.
STUDY_SEEDS ?= 3
STUDY_WORKERS ?= 2
# Threads per cell. 1 by default: one 100% cell at 2 threads trained 117 img/s in its full epochs on the
# AVX512-BF16 EPYC (bf16) against ~95 img/s of a 1-thread cell, so two 1-thread cells do ~1.6x the work.
# STUDY_WORKERS=1 STUDY_THREADS=2 only shortens one long cell's wall time (by ~20%).
STUDY_THREADS ?= 1
# STUDY_FLAGS=--report-only rewrites tables, figure and cards from the cells finished so far, running none.
STUDY_FLAGS ?=
study: study-organamnist study-headct

# The OrganAMNIST recipe every init is fine-tuned with (`make study-organamnist` and `make replicate`).
ORGAN_RECIPE = --image-size 64 --epochs $(STUDY_EPOCHS) --head-epochs 2 --patience 10 --select auc --max-val 1000 \
  --max-test 3000
study-organamnist: $(STAMP) | $(ORGAN_NPZ)
	$(CTHUB) study --data $(ORGAN_NPZ) --encoders $(STUDY_ENCODERS) --fractions $(STUDY_FRACTIONS) --seeds $(STUDY_SEEDS) \
	  $(ORGAN_RECIPE) --workers $(STUDY_WORKERS) --threads $(STUDY_THREADS) --out docs/results/study-organamnist \
	  $(STUDY_FLAGS)

# Figure 5's larger fractions, first pass: one seed of 10/25/100% for random init and the recipe's four
# encoders (smallest fraction first; resumable, so it fills in session by session: on the AVX512-BF16 EPYC a
# 10% cell took 18-45 min of one core, a 25% cell 51-105 min, a 100% cell takes several hours). More seeds: FIGURE5_SEEDS=3. One per core may run
# side by side (or beside a study of one encoder): each cell is held by the process running it, the others skip it.
FIGURE5_ENCODERS ?= scratch,spark-organamnist-cpu,byol-organamnist-cpu,mocov2-from-spark-organamnist-cpu,$\
  swav-from-spark-lr1-organamnist-cpu
FIGURE5_SEEDS ?= 1
study-figure5:
	$(MAKE) study-organamnist STUDY_ENCODERS=$(FIGURE5_ENCODERS) STUDY_FRACTIONS=0.1,0.25,1 STUDY_SEEDS=$(FIGURE5_SEEDS)

# Does the 1%-label gain survive a rebuild on another machine? The committed encoders can be rebuilt bit for bit
# only on the CPU kind that made them (docs/results/README.md), so this rebuilds SparK with `make pretrain`'s
# command into a hub of its own ($(REPLICA_HOME): the main hub and the committed study rows stay as they are),
# then fine-tunes random init and that encoder at 1% labels, 3 seeds, the study's recipe, into $(REPLICA_OUT)
# (each record names the machine and the weights). Two jobs side by side: SparK, then its cells; random init's.
REPLICA_HOME ?= $(CTHUB_HOME)-replica
REPLICA_HOME := $(REPLICA_HOME)
REPLICA_OUT ?= docs/results/study-organamnist-replica
replica_study = $(CTHUB) study --data $(ORGAN_NPZ) --encoders $(1) --fractions 0.01 --seeds 3 $(ORGAN_RECIPE) \
  --workers 1 --threads 1 --out $(REPLICA_OUT) $(STUDY_FLAGS)
replicate: export CTHUB_HOME = $(REPLICA_HOME)
replicate: RUNS = $(REPLICA_HOME)/runs
replicate: $(STAMP) | $(ORGAN_NPZ)
	@mkdir -p $(RUNS)
	$(call side_by_side,\
	  $(call pretrain_run,spark,cpu-organamnist,spark-cpu,spark-organamnist-cpu) && $(call replica_study,spark-organamnist-cpu),\
	  $(call replica_study,scratch))

# Head CT hemorrhage (../shared/data/head_ct: 200 PNG slices, windowed by the dataset's authors; labels.csv):
# the paper's brain protocol, 5 stratified folds at 100% and 75% of each training part, 3 seeds (each seed
# its own init and, at 75%, its own subset; the folds are the same for every seed).
HEAD_CT ?= ../shared/data/head_ct
HEADCT_FRACTIONS ?= 1,0.75
HEADCT_SEEDS ?= 3
study-headct: $(STAMP)
	$(CTHUB) study --data $(HEAD_CT) --protocol kfold --folds 5 --encoders $(STUDY_ENCODERS) --fractions $(HEADCT_FRACTIONS) \
	  --seeds $(HEADCT_SEEDS) --image-size 64 --epochs $(STUDY_EPOCHS) --head-epochs 2 --patience 10 --select auc \
	  --workers $(STUDY_WORKERS) --threads $(STUDY_THREADS) --out docs/results/study-headct $(STUDY_FLAGS)

# Scanner resolution. Real CT (../shared/data/real_ct: 591 DICOM slices in HU from four public sources) and the
# head CT PNGs (labels unused) -> 256 px shards, then SparK and MoCo v2 at 128 px (pretrain/recipes/
# cpu-realct128.yaml: why not 224 on a CPU is measured there), each from random init and continued from
# `make pretrain`'s SparK (hierarchical pretraining), at equal steps; two runs at a time at one thread, each
# resumable and bounded (~100 min of one idle core), published with cards (kNN monitor on labeled head CT).
REAL_CT ?= ../shared/data/real_ct
REALCT_SHARDS ?= $(CTHUB_HOME)/shards/realct256
$(REALCT_SHARDS)/index.json: | $(STAMP)
	$(CTHUB) data extract $(REAL_CT) $(HEAD_CT) --out $(REALCT_SHARDS) --size 256
# $(call realct_run,method,run folder,published name[,more flags])
realct_run = $(CTHUB) pretrain --method $(1) --data $(REALCT_SHARDS) --recipe cpu-realct128 --monitor-data $(HEAD_CT) \
  $(4) --out $(RUNS)/$(2) --resume --publish $(3) > $(RUNS)/$(2).log 2>&1
REALCT_RUNS := spark-realct128 spark-from-organ-realct128 mocov2-realct128 mocov2-from-organ-realct128
pretrain-realct: $(STAMP) | $(ORGAN_NPZ) $(REALCT_SHARDS)/index.json
	@mkdir -p $(RUNS)
	$(call pretrain_run,spark,cpu-organamnist,spark-cpu,spark-organamnist-cpu)
	$(call side_by_side,$(call realct_run,spark,spark-realct128,spark-realct128-cpu),\
	  $(call realct_run,spark,spark-from-organ-realct128,spark-from-organ-realct128-cpu,--init spark-organamnist-cpu))
	$(call side_by_side,$(call realct_run,mocov2,mocov2-realct128,mocov2-realct128-cpu),\
	  $(call realct_run,mocov2,mocov2-from-organ-realct128,mocov2-from-organ-realct128-cpu,--init spark-organamnist-cpu))
	$(CTHUB) pretrain-report $(addprefix $(RUNS)/,$(REALCT_RUNS)) --out docs/results

# Head CT hemorrhage at scanner resolution: the paper's brain protocol (5 stratified folds, 10% of each training
# part for validation), 3 seeds, at HEADCT_SIZE px (128 by default; the paper's 224: HEADCT_SIZE=224
# HEADCT_HIRES_SEEDS=1), random init beside `make pretrain`'s SparK and the best 64 px encoder on this task
# (SwAV from SparK, docs/results/study-headct) and the encoders of `make pretrain-realct`. Resumable; cells in
# parallel at one thread each; the folder per size lives in docs/results.
HEADCT_SIZE ?= 128
HEADCT_HIRES_SEEDS ?= 3
HEADCT_HIRES_ENCODERS ?= scratch,spark-organamnist-cpu,swav-from-spark-lr1-organamnist-cpu,spark-realct128-cpu,$\
  spark-from-organ-realct128-cpu,mocov2-realct128-cpu,mocov2-from-organ-realct128-cpu
study-headct-hires: $(STAMP)
	$(CTHUB) study --data $(HEAD_CT) --protocol kfold --folds 5 --encoders $(HEADCT_HIRES_ENCODERS) --fractions 1 \
	  --seeds $(HEADCT_HIRES_SEEDS) --image-size $(HEADCT_SIZE) --epochs $(STUDY_EPOCHS) --head-epochs 2 --patience 10 \
	  --select auc --workers $(STUDY_WORKERS) --threads $(STUDY_THREADS) --out docs/results/study-headct-$(HEADCT_SIZE) \
	  $(STUDY_FLAGS)

# Head CT at the paper's 224 px, one seed x 5 folds, with `make run TASK=head-ct`'s recipe (1 head-only + 8 full
# epochs, patience 4: what fits two CPU cores, ~3.5 min a cell; docs/results/scanner-resolution.md §3).
HEADCT_224_ENCODERS ?= scratch,spark-organamnist-cpu,spark-realct128-cpu
study-headct-224: $(STAMP)
	$(CTHUB) study --data $(HEAD_CT) --protocol kfold --folds 5 --encoders $(HEADCT_224_ENCODERS) --fractions 1 \
	  --seeds 1 --image-size 224 --epochs 9 --head-epochs 1 --patience 4 --select auc --workers $(STUDY_WORKERS) \
	  --threads $(STUDY_THREADS) --out docs/results/study-headct-224 $(STUDY_FLAGS)

# Contrast vs no contrast (../shared/data/real_ct/siim_contrast: 100 JPEG-LS DICOM slices of 54 patients,
# labels.csv id,label,patient; internal evaluation only): DICOM read in HU, mediastinal window W400/L40
# (measured better than the -1024..3071 interval: docs/results/siim-contrast.md), 5 folds split BY PATIENT,
# 10% of each training part for validation, 3 seeds, at SIIM_SIZE px (128; the paper's 224: SIIM_SIZE=224).
# The real-CT encoders were pretrained (labels unused) on shards that include these 100 slices: transductive.
SIIM ?= $(REAL_CT)/siim_contrast
SIIM_SIZE ?= 128
SIIM_SEEDS ?= 3
SIIM_ENCODERS ?= scratch,spark-organamnist-cpu,spark-realct128-cpu,spark-from-organ-realct128-cpu
study-siim: $(STAMP)
	$(CTHUB) study --data $(SIIM) --window mediastinum --protocol kfold --folds 5 --val-fraction 0.1 \
	  --encoders $(SIIM_ENCODERS) --fractions 1 --seeds $(SIIM_SEEDS) --image-size $(SIIM_SIZE) --epochs $(STUDY_EPOCHS) \
	  --head-epochs 2 --patience 10 --select auc --workers $(STUDY_WORKERS) --threads $(STUDY_THREADS) \
	  --out docs/results/study-siim-$(SIIM_SIZE) $(STUDY_FLAGS)

# Robustness of the classifiers of `make run` (its served model and the random-init baseline, both in
# $(MODELS)/organamnist-*) in the manner of Ghesu et al.: test AUC under HU offset/scale, rotation, zoom and
# resolution shifts of their own test images (finetune/robustness.py; table in docs/results/robustness).
ROBUSTNESS_MODELS ?= $(dir $(wildcard $(MODELS)/organamnist-*/model.safetensors))
.PHONY: robustness
robustness: $(STAMP) | $(ORGAN_NPZ)
	@test -n "$(ROBUSTNESS_MODELS)" || { echo "no classifier in $(MODELS)/organamnist-*: make run"; exit 1; }
	$(CTHUB) robustness $(ROBUSTNESS_MODELS) --data $(ORGAN_NPZ) --threads 1 --out docs/results/robustness

# Everything the results in docs/results need, in order; every step resumes where it stopped.
experiments: pretrain evaluate study pretrain-extra

bench: $(STAMP)
	$(PY) -m bench

# The GPU path in one run (docs/gpu-check.md). On the GPU machine, no venv: `make gpu-check PY=python3` (the
# image's CUDA torch; what the image lacks comes from the carried .gpu-check/wheels). Without a GPU: the same
# steps on the CPU at 64 px, a few steps each ("no GPU found: dry run on CPU"). `make gpu-wheels` fills
# .gpu-check/ (wheels for Python 3.12 + a real-data sample; ignored, carried, never committed).
GPU_CHECK_FLAGS ?=
.PHONY: gpu-check gpu-wheels
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	$(PY) -m bench.gpu_check $(GPU_CHECK_FLAGS)
gpu-wheels: $(STAMP)
	$(PY) -m bench.gpu_wheels

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf models .pytest_cache build *.egg-info

# PACS in the loop (README "PACS in the loop"): Debian's Orthanc (apt-get install orthanc orthanc-dicomweb) on
# 127.0.0.1 with the classifier of `make run`; each CT series sent to it gets a DICOM SR in its study. Ctrl+C stops both.
PACS_DIR ?= $(CTHUB_HOME)/pacs
PACS_HTTP_PORT ?= 8042
PACS_DICOM_PORT ?= 4242
.PHONY: pacs
pacs: $(STAMP) | $(ORGAN_NPZ)
	$(CTHUB) quickstart --data $(ORGAN_NPZ) --budget $(BUDGET) --models $(MODELS)
	$(CTHUB) pacs --model $(MODELS)/organamnist-ssl --dir $(PACS_DIR) --http-port $(PACS_HTTP_PORT) --dicom-port $(PACS_DICOM_PORT)

# Out of distribution, measured (docs/results/ood-shifts.md): each served model's OOD score against real
# shifts (whole CT slices of real_ct/, head CT for a body model / body CT for a head model, MR, ultrasound and
# X-ray objects of pydicom's test files, photographs, screen captures, windowing mistakes), one row per shift,
# JSON + table in docs/results/ood-shifts/, recorded in the model's card. Models without model.onnx are skipped.
OOD_MODELS ?= $(MODELS)/organamnist-ssl $(MODELS)/head-ct-ssl
OOD_REAL_DATA ?= ../shared/data
OOD_FLAGS ?=
.PHONY: study-ood
study-ood: $(STAMP)
	@for m in $(OOD_MODELS); do \
	  if [ -f $$m/model.onnx ]; then $(CTHUB) evaluate-ood --model $$m --real-data $(OOD_REAL_DATA) \
	    --out docs/results/ood-shifts --record $(OOD_FLAGS) || exit 1; \
	  else echo "study-ood: no $$m/model.onnx, skipped"; fi; done
