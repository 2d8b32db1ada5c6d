# Set-up and the main jobs. Run as root on Debian (or with sudo for the apt step).
#   make run    installs everything, trains the post's network, evaluates it, writes the plots
#   make test   installs everything and runs the whole test suite (CI's gate)
#   make check  ruff and the fast tests: no real data, no trained model, a few minutes
#   make lint   ruff alone (seconds)
#   make docs   build the documentation site into site/ (mkdocs --strict: a dead link fails it)
# Installs are skipped when there is nothing to do (the stamp is newer than pyproject.toml).
# Run folders are never overwritten: `make run` trains RUN_DIR once, resumes it when interrupted,
# and afterwards evaluates the finished run again (make run RUN_DIR=runs/post-2 trains another).

PYTHON ?= python3
PIP = $(PYTHON) -m pip
RUN_DIR ?= runs/post
# Where pip finds torch when it is missing: empty for your default index (the CPU build only where
# that index serves it); https://download.pytorch.org/whl/cpu for PyTorch's own CPU wheels.
TORCH_INDEX ?=

STAMP = build/.installed

.PHONY: install data deps run test check lint docs bench clean

install: data deps

data:  ## Fashion-MNIST from Debian, into /usr/share/datasets/fashion-mnist
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || ! command -v chromium >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium chromium-driver; \
	fi

deps: $(STAMP)

$(STAMP): pyproject.toml  ## torch first (from TORCH_INDEX when given), then fmnist and its extras
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev]'
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

run: install
	@if [ -f $(RUN_DIR)/model.json ]; then \
		echo "$(RUN_DIR) holds a finished run: evaluating it (make run RUN_DIR=runs/other trains a new one)"; \
	elif [ -f $(RUN_DIR)/metrics.jsonl ] || [ -f $(RUN_DIR)/last.pt ]; then \
		echo "$(RUN_DIR) holds an unfinished run: resuming it"; fmnist train --resume $(RUN_DIR); \
	else \
		fmnist train --out $(RUN_DIR); \
	fi
	fmnist evaluate --model $(RUN_DIR)

test: install
	$(PYTHON) -m pytest

check: lint
	$(PYTHON) -m pytest -m "not slow and not real_data" -q

lint: deps
	$(PYTHON) -m ruff check src tests bench

docs: deps
	$(PYTHON) -m mkdocs build --strict

bench: install
	$(PYTHON) bench/train_speed.py
	$(PYTHON) bench/eval_speed.py

clean:
	rm -rf runs build site *.egg-info .pytest_cache
