# The two commands of the README's quick start. Each sets up its own environment first.
#   make train   # the whole method on the built-in shapes world (CPU, minutes)
#   make test    # the test suite, offline
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.complete: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

.PHONY: setup train test
setup: $(VENV)/.complete

train: setup
	$(PY) train.py $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
