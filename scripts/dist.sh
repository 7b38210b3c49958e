#!/usr/bin/env bash
# Packs a built module as <outdir>/pgcache-<version>-<target>.tar.gz: the
# module stripped of debug info (pgcache.so), sql/pgcache.sql, README.md,
# LICENSE and CHANGELOG.md. `make dist` builds first, then runs this.
#   scripts/dist.sh [module (target/release/libpgcache.so)] [outdir (dist)]
set -euo pipefail
cd "$(dirname "$0")/.."
module=${1:-target/release/libpgcache.so}
outdir=${2:-dist}
[ -f "$module" ] || { echo "dist: $module not found: build it first (cargo build --release)" >&2; exit 1; }
# The workspace's one version.
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "dist: no [workspace.package] version in Cargo.toml" >&2; exit 1; }
target=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')
target=${target:-$(uname -m)-unknown-linux-gnu}
name=pgcache-$version-$target
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$name/sql" "$outdir"
strip --strip-debug -o "$stage/$name/pgcache.so" "$module"
cp sql/pgcache.sql "$stage/$name/sql/"
cp README.md LICENSE CHANGELOG.md "$stage/$name/"
tar -C "$stage" -czf "$outdir/$name.tar.gz" "$name"
echo "$outdir/$name.tar.gz: $(du -h "$outdir/$name.tar.gz" | cut -f1) (pgcache.so $(wc -c < "$stage/$name/pgcache.so") bytes)"
