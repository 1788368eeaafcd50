# label_reg: every target installs what it needs into $(VENV) first (`make install TF_EXTRA=gpu` for GPU TensorFlow).
PYTHON    ?= python3
VENV      ?= .venv
TF_EXTRA  ?= cpu
PY        := $(VENV)/bin/python
LABEL_REG := $(VENV)/bin/label-reg

# Training: make train-mixplus DATA=path/to/paired/data [PRESET=cpu] [FOLD=0] [PREALIGN=gland] [RUNS=runs]
#           (train-mixplus_landmarks: MIX+ with landmark supervision, experiments/mixplus_landmarks.flags;
#            train-mixplus_affine / train-mixplus_landmarks_affine: the same with the global affine stage)
#           [EXTRA="--num_steps=100"] [SEGMENTER_EXTRA=...] [TAG=name]
# PREALIGN=gland pre-aligns on the TRUS gland found by that fold's segmenter (runs/segmenter[_PRESET]_foldK), which
# is trained first unless it is already there; the run is then runs/<experiment>_gland[_PRESET]_foldK.
# TAG names a variant made with EXTRA so that it gets its own run folder, runs/<experiment>[_gland]_TAG[_PRESET]_foldK
# (e.g. TAG=rot15 EXTRA="--augment_rotation_deg=15"); the segmenters are shared.
DATA   ?= $(LABEL_REG_DEMO_DATA)
FOLD   ?= 0
FOLDS  ?= 0 1 2 3 4
PRESET ?=
PREALIGN ?=
RUNS   ?= runs
EXTRA  ?=
SEGMENTER_EXTRA ?=
TAG    ?=
PRESET_FLAGS = $(if $(PRESET),--flagfile=experiments/$(PRESET).flags)
SEGMENTER_PRESET_FLAGS = $(if $(wildcard experiments/segmenter_$(PRESET).flags),--flagfile=experiments/segmenter_$(PRESET).flags)
RUN_NAME = $(1)$(if $(PRESET),_$(PRESET))_fold$(2)
GLAND = $(filter gland,$(PREALIGN))
EXPERIMENT_RUN = $(call RUN_NAME,$(1)$(if $(GLAND),_gland)$(if $(TAG),_$(TAG)),$(2))
SEGMENTER_DIR = $(RUNS)/$(call RUN_NAME,segmenter,$(1))
GLAND_FLAGS = $(if $(GLAND),--prealign=trus_gland --segmenter_dir=$(call SEGMENTER_DIR,$(1)))
# Trains fold $(1)'s segmenter unless its model directory is already complete.
define ENSURE_SEGMENTER
test -f $(call SEGMENTER_DIR,$(1))/model.weights.h5 || $(LABEL_REG) train-segmenter \
  --flagfile=experiments/segmenter.flags $(SEGMENTER_PRESET_FLAGS) --data_dir=$(DATA) \
  --model_dir=$(call SEGMENTER_DIR,$(1)) --fold=$(1) $(SEGMENTER_EXTRA)
endef

.PHONY: install test demo rotation-study bench evaluate export clean-runs check-data \
        train-mdsc train-sdm train-mix train-mixplus train-mixplus_landmarks train-mixplus_affine \
        train-mixplus_landmarks_affine train-all-folds train-segmenter

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(TF_EXTRA),test]"
	touch $@

test: install
	$(PY) -m pytest -q

check-data:
	@test -n "$(DATA)" || { echo "set DATA=path/to/paired/data (moving_images/, moving_labels/, fixed_images/, fixed_labels/)"; exit 2; }

train-segmenter: install check-data
	$(LABEL_REG) train-segmenter --flagfile=experiments/segmenter.flags $(SEGMENTER_PRESET_FLAGS) --data_dir=$(DATA) \
	  --model_dir=$(call SEGMENTER_DIR,$(FOLD)) --fold=$(FOLD) $(SEGMENTER_EXTRA)

train-mdsc train-sdm train-mix train-mixplus train-mixplus_landmarks train-mixplus_affine \
train-mixplus_landmarks_affine: train-%: install check-data
	$(if $(GLAND),$(call ENSURE_SEGMENTER,$(FOLD)))
	$(LABEL_REG) train --flagfile=experiments/$*.flags $(PRESET_FLAGS) --data_dir=$(DATA) \
	  --model_dir=$(RUNS)/$(call EXPERIMENT_RUN,$*,$(FOLD)) --fold=$(FOLD) \
	  $(call GLAND_FLAGS,$(FOLD)) $(EXTRA)

# All folds of one experiment, one after the other: make train-all-folds EXPERIMENT=mixplus DATA=... PRESET=cpu
EXPERIMENT ?= mixplus
train-all-folds: install check-data
	for fold in $(FOLDS); do \
	  $(if $(GLAND),$(call ENSURE_SEGMENTER,$$fold) || exit $$?;) \
	  $(LABEL_REG) train --flagfile=experiments/$(EXPERIMENT).flags $(PRESET_FLAGS) --data_dir=$(DATA) \
	    --model_dir=$(RUNS)/$(call EXPERIMENT_RUN,$(EXPERIMENT),$$fold) --fold=$$fold \
	    $(call GLAND_FLAGS,$$fold) $(EXTRA) || exit $$?; \
	done

# Score a trained run on its validation fold, and export it for TF Serving:
#   make evaluate MODEL=runs/mixplus_cpu_fold0 [EVAL_OUT=eval/mixplus_cpu_fold0]
#   make export MODEL=runs/mixplus_cpu_fold0 [SERVING_OUT=serving/label_reg]
MODEL       ?= $(RUNS)/mixplus_cpu_fold0
EVAL_OUT    ?= eval/$(notdir $(MODEL))
SERVING_OUT ?= serving/label_reg
evaluate: install
	$(LABEL_REG) evaluate --model_dir=$(MODEL) --output_dir=$(EVAL_OUT) --figures

export: install
	$(LABEL_REG) export --model_dir=$(MODEL) --output_dir=$(SERVING_OUT)

# Speed and memory on this machine, one table (also written as CSV); see README "Benchmarks".
BENCH_OUT ?= bench.csv
bench: install
	$(PY) tools/bench.py --output $(BENCH_OUT)

# A newcomer's first run: phantoms -> segmenter and MIX+ trainings -> registration of held-out phantoms -> table.
DEMO_OUT ?= demo_out
demo: install
	$(PY) tools/demo.py --output_dir $(DEMO_OUT) --overwrite

# Does a trained global affine stage register rotated pairs? Rotated phantoms -> MIX+ without and with the stage ->
# held-out pairs turned by 25 degrees -> table (see README "Global affine stage"). [EXTRA="--num_steps=..."]
ROTATION_OUT ?= runs/rotation_study
rotation-study: install
	$(PY) tools/rotation_study.py --output_dir $(ROTATION_OUT) --overwrite $(EXTRA)
