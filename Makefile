# The two commands README promises: `make demo` and `make test`.
CARGO ?= cargo
SHELL := /bin/bash

.PHONY: demo test lint build deps unit integration

## Installs system packages, the newer containerd/cosign/imgcrypt/kubectl releases and the pinned
## kubernetes-validate (idempotent).
deps:
	@if [ "$$(id -u)" != 0 ]; then echo "make deps needs root (apt-get)"; exit 1; fi
	@missing=$$(for p in $$(cat .ci/packages.txt); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	@integration/scripts/fetch-components.sh
	@integration/scripts/fetch-kubernetes-validate.sh

build:
	$(CARGO) build --workspace --bins

## A local demo on embedded defaults: everything under one temporary directory, torn down at the end.
## Runs the binary `build` just made: `cargo run -p integration` would resolve features for that
## one package, differently from the workspace build, and silently rebuild half the graph.
demo: deps build
	"$${CARGO_TARGET_DIR:-target}/debug/demo"

## Every unit and integration test (the end-to-end suites need root and run against containerd 1.6, 1.7 and 2.1),
## then guest-puller's unit tests once more in its default (minimal guest) feature set, which the
## workspace build never compiles: the integration crate turns on `lazy` and `gpg`.
test: deps build
	$(CARGO) test --workspace --no-fail-fast
	$(CARGO) test -p guest-puller --lib

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
