# parle_jax: `make train` runs the default experiment, `make test` the tests.
# Both build the environment (.venv, pinned requirements.txt) and the data from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(CURDIR)/data
WORKDIR ?= $(CURDIR)/workdirs/default
# pytest-xdist workers for `make test` (CI has 2 cores; they share the prepared data and compiled programs).
TEST_WORKERS ?= 2
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
export PARLE_DATA_DIR := $(DATA_DIR)

.PHONY: env data train test benchmark roofline gpu-carry clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The offline Fashion-MNIST files (Debian package); TFDS downloads them instead where there is internet.
data:
	@if [ -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist (Fashion-MNIST files) ..."; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) ; \
	else \
	  echo "Fashion-MNIST files not found in $(FASHION_MNIST_DIR): run 'sudo apt-get install -y dataset-fashion-mnist'" \
	       "(Debian/Ubuntu), or keep internet access so TFDS can download fashion_mnist."; \
	fi

train: env data
	$(BIN)/python -m experiments.train --config=experiments/configs/default.py --workdir=$(WORKDIR)

test: env data
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest tests -q --durations=15 -n $(TEST_WORKERS) --dist=loadfile --no-loadscope-reorder

benchmark: env
	$(BIN)/python -m experiments.benchmark

roofline: env
	$(BIN)/python -m experiments.roofline

# What experiments/gpu_session.sh needs on a GPU machine without network, TFDS or
# ml_collections: Fashion-MNIST as compressed .npz and wheels (Python 3.11 and 3.12).
CARRY ?= .carry
gpu-carry: env data
	$(BIN)/python -c "import numpy as np, os; from parle_jax import data; \
	  out = '$(CARRY)/data/fashion_mnist'; os.makedirs(out, exist_ok=True); \
	  [np.savez_compressed(f'{out}/{s}.npz', **data.load('fashion_mnist', s, '$(DATA_DIR)')) \
	   for s in ('train', 'test')]"
	$(BIN)/pip download --quiet --no-deps -d $(CARRY)/wheels \
	  $$(grep '^ml_collections==' requirements.txt)
	for v in 3.11 3.12; do $(BIN)/pip download --quiet --no-deps --only-binary=:all: \
	  --python-version $$v --platform manylinux2014_x86_64 -d $(CARRY)/wheels PyYAML==6.0.3; done
	du -sh $(CARRY)

clean:
	rm -rf $(VENV) workdirs $(CARRY)
