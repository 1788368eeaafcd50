# label_reg: every target installs what it needs into $(VENV) first (`make install TF_EXTRA=gpu` for GPU TensorFlow).
PYTHON    ?= python3
VENV      ?= .venv
TF_EXTRA  ?= cpu
PY        := $(VENV)/bin/python
LABEL_REG := $(VENV)/bin/label-reg

# Training: make train-mixplus DATA=path/to/paired/data [PRESET=cpu] [FOLD=0] [RUNS=runs] [EXTRA="--num_steps=100"]
DATA   ?= $(LABEL_REG_DEMO_DATA)
FOLD   ?= 0
FOLDS  ?= 0 1 2 3 4
PRESET ?=
RUNS   ?= runs
EXTRA  ?=
PRESET_FLAGS = $(if $(PRESET),--flagfile=experiments/$(PRESET).flags)
RUN_NAME = $(1)$(if $(PRESET),_$(PRESET))_fold$(2)

.PHONY: install test demo bench evaluate export clean-runs check-data \
        train-mdsc train-sdm train-mix train-mixplus train-all-folds

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

train-mdsc train-sdm train-mix train-mixplus: train-%: install check-data
	$(LABEL_REG) train --flagfile=experiments/$*.flags $(PRESET_FLAGS) --data_dir=$(DATA) \
	  --model_dir=$(RUNS)/$(call RUN_NAME,$*,$(FOLD)) --fold=$(FOLD) $(EXTRA)

# All folds of one experiment, one after the other: make train-all-folds EXPERIMENT=mixplus DATA=... PRESET=cpu
EXPERIMENT ?= mixplus
train-all-folds: install check-data
	for fold in $(FOLDS); do \
	  $(LABEL_REG) train --flagfile=experiments/$(EXPERIMENT).flags $(PRESET_FLAGS) --data_dir=$(DATA) \
	    --model_dir=$(RUNS)/$(call RUN_NAME,$(EXPERIMENT),$$fold) --fold=$$fold $(EXTRA) || exit $$?; \
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

# A newcomer's first run: phantoms -> short MIX+ training -> registration of held-out phantoms -> table.
DEMO_OUT ?= demo_out
demo: install
	$(PY) tools/demo.py --output_dir $(DEMO_OUT) --overwrite
