# Two commands matter: `make run` serves the service (embedded store, dev key,
# reflection on) and `make test` runs every test. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUF := tools/node_modules/.bin/buf

.PHONY: install run run-mtls test lint gen gen-check buf-lint buf-breaking bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ./clients/python -e '.[dev]'
	touch $@

install: $(STAMP)

run: install
	$(BIN)/integrations-service serve

# The same, over mutual TLS with development certificates in .data/dev-certs (see README).
run-mtls: install
	test -f .data/dev-certs/server.crt || $(BIN)/integrations-service dev-certs
	INTEGRATIONS_TLS_CERT=.data/dev-certs/server.crt INTEGRATIONS_TLS_KEY=.data/dev-certs/server.key \
	INTEGRATIONS_TLS_CLIENT_CA=.data/dev-certs/ca.crt INTEGRATIONS_AUTHZ_POLICY=.data/dev-certs/policy.toml \
	$(BIN)/integrations-service serve

test: install
	$(BIN)/python -m pytest

gen: install
	$(BIN)/python tools/gen_protos.py

gen-check: install
	$(BIN)/python tools/gen_protos.py --check

$(BUF): tools/package.json tools/package-lock.json
	npm ci --prefix tools --no-audit --no-fund --loglevel=error
	touch $@

buf-lint: $(BUF)
	$(BUF) lint

# Compares protos/ with main's: no wire- or source-breaking change once v1 has landed.
buf-breaking: $(BUF)
	@if git rev-parse --verify --quiet origin/main >/dev/null; then against=origin/main; \
	  elif git rev-parse --verify --quiet main >/dev/null; then against=main; else against=; fi; \
	if [ -n "$$against" ] && git cat-file -e "$$against:protos" 2>/dev/null; then \
	  $(BUF) breaking --against ".git#ref=$$against"; \
	else echo "buf breaking: no protos on main yet, nothing to compare"; fi

lint: install buf-lint gen-check
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache tools/node_modules
