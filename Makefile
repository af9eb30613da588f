# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
# The dev install includes the optional `deepspeed` extra, so the DeepSpeed test of the slow tier runs in CI.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
# NumPy's threaded BLAS slows small SVDs ~100x on a busy 2-core machine; torch keeps its own threads.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: install demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,deepspeed]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cytosyn demo --output demo_out

test: install
	$(PY) -m pytest -q -m "not slow and not gpu"

# pytest exits 5 when no test is selected (no slow test yet); every other non-zero code fails.
test-slow: install
	$(PY) -m pytest -q -m "slow and not gpu" || [ $$? -eq 5 ]

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/tiler.py

clean:
	rm -rf demo_out .pytest_cache
