# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per level: the runtime (`make demo`) and the test toolchain on top of it (`make
# test`). Each re-installs only when the project's metadata changed; otherwise a no-op. So
# `make demo` never pulls in pytest, moto, ruff and mypy, and `make test` after it adds them.
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: setup setup-test demo test test-fast lint bench clean redis promtool

setup: $(RUNTIME)

setup-test: $(TESTING)

$(RUNTIME): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $(RUNTIME)

$(TESTING): $(RUNTIME)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(TESTING)

redis:
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

# promtool (for the alert-rule test) from Debian's prometheus package, unpacked into the
# venv: installing the package would also start a Prometheus server. Without it, the test
# evaluates the rules in Python.
promtool: setup
	@command -v promtool >/dev/null 2>&1 || test -x $(BIN)/promtool || \
	  (d=$$(mktemp -d) && cd $$d && apt-get download prometheus >/dev/null 2>&1 && \
	   dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > $(CURDIR)/$(BIN)/promtool && \
	   chmod +x $(CURDIR)/$(BIN)/promtool; rm -rf $$d) || \
	  echo "promtool not available: the alert-rule test evaluates the rules in Python"

demo: setup
	$(BIN)/python -m workers.demo

test: setup-test redis promtool
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy workers beat
	$(BIN)/python -m pytest tests

# The tests that need no Redis, Celery or S3 server and take less than about 5 s each
# (markers in pyproject.toml): under a minute, for the edit-test loop. No lint.
FAST := not distributed and not s3 and not slow

test-fast: setup-test
	$(BIN)/python -m pytest tests -q -m "$(FAST)"

lint: setup-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/mypy workers beat

bench: setup-test
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache
