# Set-up and the two main jobs. Run as root on Debian (or with sudo for the apt step).
#   make run    installs everything, trains the post's network, evaluates it, writes the plots
#   make test   installs everything and runs the test suite

PYTHON ?= python3
PIP = $(PYTHON) -m pip
RUN_DIR ?= runs/post

.PHONY: install data deps run test bench clean

install: data deps

data:  ## Fashion-MNIST from Debian, into /usr/share/datasets/fashion-mnist
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || ! command -v chromium >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium chromium-driver; \
	fi

deps:  ## the CPU build of torch first, so nothing pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'

run: install
	rm -rf $(RUN_DIR)
	fmnist train --out $(RUN_DIR)
	fmnist evaluate $(RUN_DIR)

test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) bench/train_speed.py
	$(PYTHON) bench/eval_speed.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
