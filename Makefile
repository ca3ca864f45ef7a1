# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test fuzz lint install clean

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

test: lint
	$(BIN)/python -m pytest -q tests

# the long fuzzing campaign: FUZZ_SCALE x each target's `make test` budget of cases, from a random seed (`make test`
# runs the short budget from a fixed seed)
FUZZ_SCALE ?= 32
fuzz: $(STAMP)
	VLRL_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q tests/fuzz

clean:
	rm -rf runs .pytest_cache
