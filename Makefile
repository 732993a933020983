# Two commands matter: `make run` serves the service (embedded store, dev key,
# reflection on) and `make test` runs every test. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUF := tools/node_modules/.bin/buf
TS := clients/typescript
TS_STAMP := $(TS)/node_modules/.installed-stamp

.PHONY: install run run-mtls test lint gen gen-check buf-lint buf-breaking buf-baseline observability-check \
	kubernetes-validate bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ./clients/python -e '.[dev]'
	touch $@

install: $(STAMP) $(TS_STAMP)

# Serving needs only the Python environment: no Node.js (that is for the TypeScript client and its tests).
run: $(STAMP)
	$(BIN)/integrations-service serve

# The same, over mutual TLS with development certificates in .data/dev-certs (see README),
# written anew when missing or expiring within a day.
run-mtls: $(STAMP)
	$(BIN)/integrations-service dev-certs --if-expiring
	INTEGRATIONS_TLS_CERT=.data/dev-certs/server.crt INTEGRATIONS_TLS_KEY=.data/dev-certs/server.key \
	INTEGRATIONS_TLS_CLIENT_CA=.data/dev-certs/ca.crt INTEGRATIONS_AUTHZ_POLICY=.data/dev-certs/policy.toml \
	$(BIN)/integrations-service serve

# Two processes (pytest-xdist), each file's tests on one of them: see tests/conftest.py.
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

gen: install
	$(BIN)/python tools/gen_protos.py

gen-check: install
	$(BIN)/python tools/gen_protos.py --check

$(BUF): tools/package.json tools/package-lock.json
	npm ci --prefix tools --no-audit --no-fund --loglevel=error
	touch $@

# The TypeScript client (clients/typescript): its npm dependencies from the lockfile,
# its generated code (committed; `make ts-gen` after a proto change), and its build.
$(TS_STAMP): $(TS)/package.json $(TS)/package-lock.json
	npm ci --prefix $(TS) --no-audit --no-fund --loglevel=error
	touch $@

ts-install: $(TS_STAMP)

ts-gen: $(BUF) $(TS_STAMP)
	$(BUF) generate --template $(TS)/buf.gen.yaml

ts-gen-check: $(BUF) $(TS_STAMP)
	@out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && \
	$(BUF) generate --template $(TS)/buf.gen.yaml -o "$$out" && \
	if diff -r "$$out/$(TS)/src/gen" $(TS)/src/gen; then echo "TypeScript generated code matches protos/"; \
	else echo "TypeScript generated code is out of date with protos/ (run \`make ts-gen\`)"; exit 1; fi

ts-build: $(TS_STAMP)
	npm run --prefix $(TS) --silent build

.PHONY: ts-install ts-gen ts-gen-check ts-build
# `make lint` checks the TypeScript client too: src/gen matches the protos, and tsc (strict) passes.
lint: ts-gen-check ts-build

buf-lint: $(BUF)
	$(BUF) lint

# The wire and source contract of v1: protos/v1-baseline.binpb is the API as released
# (`make buf-baseline` records it). Any change must be compatible with it.
buf-breaking: $(BUF)
	$(BUF) breaking --against protos/v1-baseline.binpb

# Only after a reviewed, compatible API change has landed: record it as the new baseline.
buf-baseline: $(BUF)
	$(BUF) build -o protos/v1-baseline.binpb

# The operator kit against a real scrape: promtool check metrics on it, promtool check rules
# on the alerts and on every dashboard query (promtool: Debian package prometheus, see .ci/run).
observability-check: install
	$(BIN)/python tools/check_observability.py

# The manifests against the API schemas of the oldest and newest Kubernetes we support (offline).
KUBERNETES_VERSIONS := 1.30.0 1.37.0
kubernetes-validate: install
	for version in $(KUBERNETES_VERSIONS); do \
	  $(BIN)/kubernetes-validate --strict --quiet -k $$version deploy/kubernetes/*.yaml || exit 1; \
	done

lint: install buf-lint gen-check observability-check kubernetes-validate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The client's declared lower bounds are real: installed exactly, in a throwaway virtualenv, it imports.
.PHONY: lowest-deps
lowest-deps: install
	$(BIN)/python tools/check_lowest_deps.py clients/python integrations_client integrations.v1.integrations_pb2_grpc

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache tools/node_modules $(TS)/node_modules $(TS)/dist
