# Two commands on a fresh machine:  `make demo` (the main job on the default model) and `make test`.
# Each creates .venv and installs the exact versions of requirements/lock-cpu.txt on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock-cpu.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha256sum | cut -c1-12)
# What the real-model tests read (SmolLM2-135M-Instruct, Shakespeare, the eval sets: ~40 s cold).
TEST_ASSETS := smollm2-135m-instruct shakespeare evalsets

.PHONY: demo test test-latest lock bench install clean

# Locked install: pip and setuptools first (the build backend, so the editable build uses the
# locked one: --no-build-isolation), then the project with every dependency constrained.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e ".[test,eval]"
	$(PY) requirements/check_lock.py --sync $(LOCK)
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.compress

test: $(STAMP)
	$(PY) -m experiments.assets fetch $(TEST_ASSETS)
	$(PY) -m pytest -q tests

# The newest versions pyproject allows, in a separate venv: run it to see the next breaking
# release before users do (result recorded in BUILD.md).
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip setuptools
	.venv-latest/bin/python -m pip install -q --no-build-isolation -e ".[test,eval]"
	.venv-latest/bin/python -m pip freeze --all --exclude-editable > .venv-latest/resolved.txt
	diff $(LOCK) .venv-latest/resolved.txt | grep '^[<>] [A-Za-z]' || echo "latest == lock"
	.venv-latest/bin/python -m experiments.assets fetch $(TEST_ASSETS)
	.venv-latest/bin/python -m pytest -q tests

# Re-resolve the lock from pyproject's ranges (then run `make test` and commit both).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools
	.venv-lock/bin/python -m pip install -q --no-build-isolation -e ".[test,eval]"
	{ head -2 $(LOCK); .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock

bench: $(STAMP)
	$(PY) -m bench.forward

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache
