# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv bytecode demo test bench up down clean purge

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
	$(BIN)/python -m compileall -q essential orchestration persistence actors bench examples tests

demo: bytecode
	$(BIN)/essential demo

# the suite prints its 25 slowest tests: the whole must stay well under 30 minutes
test: bytecode
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25

bench: bytecode
	$(BIN)/python -m bench.saga_bench

# Randomized fault soak, 1.5-3 min per placement (at most ~10): each placement in turn, or PLACEMENT=pooled for one;
# SOAK_ARGS passes options through (e.g. SOAK_ARGS="--seed 7", or "--sagas 40 --kill-for 20" for a short run).
.PHONY: soak
soak: bytecode
	@status=0; for placement in $(or $(PLACEMENT),dedicated pooled shared); do \
	  $(BIN)/python -m bench.soak --placement $$placement $(SOAK_ARGS) || status=1; \
	done; exit $$status

up: bytecode
	$(BIN)/essential up

down: $(STAMP)
	$(BIN)/essential down

# Build artefacts and the virtual environment only: the local saga data in .essential stays.
clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info test-artifacts

# Everything `clean` removes, and .essential: all local saga data. Asks first (or: make purge YES=1).
purge:
	@if [ -f .essential/stack.json ]; then echo "the local stack is running: run 'make down' first"; exit 1; fi
	@if [ "$(YES)" != "1" ]; then \
	  printf "delete .essential (every local saga, stage and event, the example data)? [y/N] "; read answer; \
	  case "$$answer" in [yY]*) ;; *) echo "kept .essential"; exit 1;; esac; \
	fi
	rm -rf .essential
	$(MAKE) clean
