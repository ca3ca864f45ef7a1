# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test test-vllm vllm-env fuzz lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# `make demo arch=internvl` runs the same pipeline on the tiny InternVL (into runs/demo-internvl)
demo: $(STAMP)
	$(BIN)/python -m vlrl.demo out=runs/demo$(if $(arch),-$(arch) arch=$(arch))

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/mypy src

# tests/with_vllm needs vLLM's own environment (minutes to build, GBs): `make test-vllm` runs it
# TEST_WORKERS pytest-xdist workers (worksteal: the few long multi-process tests do not leave a worker idle)
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 tests --ignore=tests/with_vllm

# vLLM's environment, beside vlrl's (its CPU build pins an older transformers); rebuilt when its script changes
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): scripts/vllm-env.sh
	VLLM_VENV=$(VLLM_VENV) PY=$(PY) bash scripts/vllm-env.sh
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# the vllm rollout engine against real vLLM workers; VLRL_REQUIRE_VLLM turns a missing environment into a failure
test-vllm: $(STAMP) vllm-env
	VLRL_REQUIRE_VLLM=1 VLRL_VLLM_PYTHON=$(abspath $(VLLM_VENV)/bin/python) $(BIN)/python -m pytest -q tests/with_vllm

# the long fuzzing campaign: FUZZ_SCALE x each target's `make test` budget of cases, from a random seed (`make test`
# runs the short budget from a fixed seed)
FUZZ_SCALE ?= 32
fuzz: $(STAMP)
	VLRL_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q tests/fuzz

clean:
	rm -rf runs .pytest_cache
