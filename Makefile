# Two commands on a fresh machine: `make demo` (install + main job) and `make test` (install + tests).
# `make wheel-check` (CI runs it too): the package as a user installs it, from the wheel into a clean venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install test wheel-check demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 install from this machine's local disk (see DEVELOPERS.md)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,demo,flower,simulation,hf,flwr-datasets,tracking]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

# The wheel as a user installs it: build + metadata check + a clean venv running the installed command (.ci/wheel-check)
wheel-check: install
	bash .ci/wheel-check $(PY) $(PYTHON)

demo: install
	$(PY) data/demo.py

clean:
	rm -rf $(VENV) demo-out build
