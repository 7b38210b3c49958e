#!/usr/bin/env bash
# Build the module: leaves ./pgcache.so (and target/release/libpgcache.so).
# Extra arguments go to make, e.g. `./build_module.sh clean all`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
exec make "$@"
