# label_reg: every target installs what it needs into $(VENV) first.
PYTHON   ?= python3
VENV     ?= .venv
TF_EXTRA ?= cpu
PY       := $(VENV)/bin/python
LABEL_REG := $(VENV)/bin/label-reg

.PHONY: install test
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(TF_EXTRA),test]"
	touch $@

test: install
	$(PY) -m pytest -q
