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
.PHONY: all build clean deps test run lint bench help fuzz dist

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

## test: deps, build, then unit + integration tests (TEST_THREADS=2; TEST_CMD overrides; PGCACHE_SERVER=valkey runs them on Valkey 8.1)
# Each integration test starts its own redis-server and PostgreSQL on free
# ports, so parallelism is kept modest. PGCACHE_SERVER=valkey (environment or
# make variable) starts valkey-server from .deps/valkey instead.
test: deps
	$(CARGO) build --release
	@echo "test: integration tests on $${PGCACHE_SERVER:-redis}"
	$(TEST_CMD)

## run: deps, build, then start PostgreSQL + Redis with the module and a demo (PGCACHE_SOURCE=replication: invalidation by logical replication)
run: deps
	$(MAKE) --no-print-directory all
	bash scripts/run.sh

## dist: release build, stripped, packed as dist/pgcache-<version>-<target>.tar.gz (with sql/pgcache.sql, README, LICENSE, CHANGELOG)
dist: deps
	$(CARGO) build --release
	bash scripts/dist.sh $(MODULE) dist

## lint: rustfmt check and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: invalidation latency, then the suite (bench/suite.rs: issue-5 figures, then writes per invalidation source, bench/writes.rs); results into BENCHMARKS.md, chart bench/results.png
# The suite reads the invalidation bench's output from target/bench-invalidation.txt.
bench: deps
	$(CARGO) build --release
	$(CARGO) bench --bench invalidation > target/bench-invalidation.txt || { cat target/bench-invalidation.txt; exit 1; }
	@cat target/bench-invalidation.txt
	$(CARGO) bench --bench suite

## dashboard-png: draw the Grafana dashboard (contrib/grafana/pgcache.json) from a ~1 min real run into contrib/grafana/pgcache.png
# bench/dashboard.rs: a scripted workload, contrib/prometheus/pgcache.lua
# evaluated once a second as redis_exporter does, the dashboard's panels drawn.
.PHONY: dashboard-png
dashboard-png: deps
	$(CARGO) build --release
	$(CARGO) bench --bench dashboard

help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)

## fuzz: cargo-fuzz targets of crates/core, each FUZZ_SECONDS (60) s; crashes go to fuzz/artifacts/
# fuzz/ is its own cargo workspace. cargo-fuzz needs nightly features:
# RUSTC_BOOTSTRAP=1 lets the stable toolchain provide them (and AddressSanitizer).
# New inputs go to fuzz/.scratch/<target> (ignored by git), never to the seed
# corpus fuzz/corpus/<target>; `rm -rf fuzz/.scratch` starts afresh.
FUZZ_SECONDS   ?= 60
FUZZ_TARGETS   ?= canonical_key module_args notify_payload pgoutput_message
FUZZ_SANITIZER ?= address
FUZZ_ARGS      ?=
fuzz: deps
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@set -e; \
	if ! command -v c++ >/dev/null 2>&1 && command -v clang++ >/dev/null 2>&1; then export CXX=clang++; fi; \
	for t in $(FUZZ_TARGETS); do \
	    mkdir -p fuzz/.scratch/$$t; \
	    echo "== fuzz: $$t for $(FUZZ_SECONDS)s"; \
	    RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --fuzz-dir fuzz --sanitizer $(FUZZ_SANITIZER) \
	        $$t fuzz/.scratch/$$t fuzz/corpus/$$t -- \
	        -max_total_time=$(FUZZ_SECONDS) -dict=fuzz/dict/$$t.dict -print_final_stats=1 $(FUZZ_ARGS); \
	done

## memcheck: build, then tests/memcheck.rs with redis-server under valgrind; fails on any memcheck error
# Every redis-server of the scenarios runs under valgrind's memcheck (see
# `valgrind` in tests/common/mod.rs); a test fails if memcheck reports an
# invalid read/write/free, an uninitialised value or a "definitely lost"
# leak. VALGRIND_ARGS adds valgrind options, e.g. VALGRIND_ARGS=--errors-for-leak-kinds=none.
VALGRIND_ARGS ?=
.PHONY: memcheck
memcheck: deps
	@command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; } \
	    || { echo "memcheck: valgrind not found and could not be installed (apt-get install valgrind)"; exit 1; }
	$(CARGO) build --release
	PGCACHE_VALGRIND=1 PGCACHE_VALGRIND_ARGS='$(VALGRIND_ARGS)' $(CARGO) test --release --test memcheck -- --test-threads=1 --nocapture

## soak: build, then tests/consistency_random.rs with SOAK_SECONDS (300) s of random writes, reads and faults
# The randomized consistency test of `make test` (30 s of load there), longer.
# It prints its seed and figures; PGCACHE_RANDOM_SEED=<seed> replays a run's
# choices. `make soak SOAK_SECONDS=60` for a shorter one.
SOAK_SECONDS ?= 300
.PHONY: soak
soak: deps
	$(CARGO) build --release
	PGCACHE_SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --release --test consistency_random -- --test-threads=1 --nocapture
