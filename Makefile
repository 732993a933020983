# Two commands matter: `make run` serves the service (embedded store, dev key,
# reflection on) and `make test` runs every test. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUF := tools/node_modules/.bin/buf

.PHONY: install run run-mtls test lint gen gen-check buf-lint buf-breaking buf-baseline bench clean

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

# The wire and source contract of v1: protos/v1-baseline.binpb is the API as released
# (`make buf-baseline` records it). Any change must be compatible with it.
buf-breaking: $(BUF)
	$(BUF) breaking --against protos/v1-baseline.binpb

# Only after a reviewed, compatible API change has landed: record it as the new baseline.
buf-baseline: $(BUF)
	$(BUF) build -o protos/v1-baseline.binpb

lint: install buf-lint gen-check
	$(BIN)/ruff check .
	$(BIN)/mypy

# The client's declared lower bounds are real: installed exactly, in a throwaway virtualenv, it imports.
.PHONY: lowest-deps
lowest-deps: install
	$(BIN)/python tools/check_lowest_deps.py clients/python integrations_client integrations.v1.integrations_pb2_grpc

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache tools/node_modules
