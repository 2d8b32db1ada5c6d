# Set-up and the main jobs. Run as root on Debian (or with sudo for the apt step).
#   make run    installs everything, trains the post's network, evaluates it, writes the plots
#   make test   installs everything and runs the whole test suite (CI's gate)
#   make check  ruff and the fast tests: no real data, no trained model, a few minutes
# Installs are skipped when there is nothing to do (the stamp is newer than pyproject.toml).

PYTHON ?= python3
PIP = $(PYTHON) -m pip
RUN_DIR ?= runs/post

STAMP = build/.installed

.PHONY: install data deps run test check bench clean

install: data deps

data:  ## Fashion-MNIST from Debian, into /usr/share/datasets/fashion-mnist
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || ! command -v chromium >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium chromium-driver; \
	fi

deps: $(STAMP)

$(STAMP): pyproject.toml  ## the CPU build of torch first, so nothing pulls a multi-GB CUDA build
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

run: install
	rm -rf $(RUN_DIR)
	fmnist train --out $(RUN_DIR)
	fmnist evaluate $(RUN_DIR)

test: install
	$(PYTHON) -m pytest

check: deps
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m pytest -m "not slow and not real_data" -q

bench: install
	$(PYTHON) bench/train_speed.py
	$(PYTHON) bench/eval_speed.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
