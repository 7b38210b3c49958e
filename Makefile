# pgcache: build, test and run.  `make help` lists the targets.
#
# Overridable variables, e.g. `make test TEST_THREADS=1` or
# `make test TEST_CMD='cargo test --release --test commands'`.
CARGO        ?= cargo
TEST_THREADS ?= 2
TEST_ARGS    ?=
# The module crate has no unit-test binary (`test = false`: it runs only inside
# Redis); its integration tests are tests/*.rs, the other crates hold the unit tests.
TEST_CMD     ?= $(CARGO) test --workspace --release --no-fail-fast $(TEST_ARGS) -- --test-threads=$(TEST_THREADS)
MODULE       := target/release/libpgcache.so

.DEFAULT_GOAL := all
.PHONY: all build clean deps test run lint bench help

## all: build the module (cargo build --release) and copy it to ./pgcache.so
all: build
	cp -f $(MODULE) pgcache.so
	@echo "built ./pgcache.so"

build:
	$(CARGO) build --release

## clean: remove build output, ./pgcache.so and the .run folder of `make run`
clean:
	$(CARGO) clean
	rm -f pgcache.so
	rm -rf .run

## deps: install missing system packages (redis-server, PostgreSQL, libclang, ...)
deps:
	bash scripts/install-deps.sh

## test: deps, build, then unit + integration tests (TEST_THREADS=2; TEST_CMD overrides)
# Each integration test starts its own redis-server and PostgreSQL on free
# ports, so parallelism is kept modest.
test: deps
	$(CARGO) build --release
	$(TEST_CMD)

## run: deps, build, then start PostgreSQL + Redis with the module and a demo
run: deps
	$(MAKE) --no-print-directory all
	bash scripts/run.sh

## lint: rustfmt check and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: invalidation latency and PING latency while a million entries are dropped
bench: deps
	$(CARGO) build --release
	$(CARGO) bench --bench invalidation

help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)
