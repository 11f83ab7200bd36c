# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv bytecode demo test bench up down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[embedded,test]"
	touch $(STAMP)

venv: $(STAMP)

# Every Ray worker (a dedicated saga actor is one process per saga) imports the project anew; with
# PYTHONDONTWRITEBYTECODE set (common in containers) each would compile it from source. Up-to-date
# .pyc files are read even then, so write them once here (a no-op when nothing changed).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q orchestration persistence actors bench examples tests

demo: bytecode
	$(BIN)/essential demo

test: bytecode
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: bytecode
	$(BIN)/python -m bench.saga_bench

up: bytecode
	$(BIN)/essential up

down: $(STAMP)
	$(BIN)/essential down

clean:
	rm -rf $(VENV) .essential .pytest_cache
