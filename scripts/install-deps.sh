#!/usr/bin/env bash
# Install what building, testing and running pgcache needs on Debian/Ubuntu:
# redis-server (+ redis-cli), the PostgreSQL server binaries and contrib
# (pg_stat_statements), libclang-dev + clang (bindgen, used by redis-module),
# pkg-config, a C toolchain, and fonts-dejavu-core (the text of the chart that
# `make bench` draws). Rust itself is not installed here: install it
# with https://rustup.rs.
#
# Idempotent: when everything is present it only checks and exits (fast).
# Missing packages are installed with apt-get, as root, or through sudo when
# not root; without either it prints what to install and fails.
#
# Environment: PGCACHE_SKIP_DEPS=1 skips the check entirely.
set -euo pipefail

if [[ "${PGCACHE_SKIP_DEPS:-}" == 1 ]]; then
    echo "install-deps: PGCACHE_SKIP_DEPS=1, not checking system packages"
    exit 0
fi

say() { echo "install-deps: $*"; }
have() { command -v "$1" >/dev/null 2>&1; }

# Directories holding PostgreSQL server binaries, newest version last.
pg_bindirs() {
    local d
    if have pg_config; then
        d=$(pg_config --bindir 2>/dev/null || true)
        [[ -n "$d" && -x "$d/initdb" ]] && echo "$d"
    fi
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" ]] && echo "$d"
    done
    if have initdb; then dirname "$(command -v initdb)"; fi
    return 0
}

have_pg_server() {
    local d
    while read -r d; do
        [[ -x "$d/postgres" && -x "$d/pg_ctl" && -x "$d/psql" ]] && return 0
    done < <(pg_bindirs)
    return 1
}

have_pg_contrib() {
    local f
    for f in /usr/share/postgresql/*/extension/pg_stat_statements.control \
             /usr/local/share/postgresql/extension/pg_stat_statements.control \
             /usr/local/pgsql/share/extension/pg_stat_statements.control; do
        [[ -e "$f" ]] && return 0
    done
    if have pg_config; then
        f="$(pg_config --sharedir 2>/dev/null || true)/extension/pg_stat_statements.control"
        [[ -e "$f" ]] && return 0
    fi
    return 1
}

have_libclang() {
    local f
    for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang*.so* /usr/lib/libclang*.so*; do
        [[ -e "$f" ]] && return 0
    done
    [[ -n "${LIBCLANG_PATH:-}" && -d "$LIBCLANG_PATH" ]]
}

# The font bench/chart.rs loads first.
have_chart_font() {
    [[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]]
}

missing=()
have redis-server && have redis-cli || missing+=(redis-server redis-tools)
have_pg_server || missing+=(postgresql)
have_pg_contrib || missing+=(postgresql-contrib)
have_libclang || missing+=(libclang-dev)
have clang || missing+=(clang)
have pkg-config || missing+=(pkg-config)
have cc || missing+=(gcc libc6-dev)
have_chart_font || missing+=(fonts-dejavu-core)
have prometheus-redis-exporter || missing+=(prometheus-redis-exporter)

rc=0
if ((${#missing[@]} == 0)); then
    say "system packages: all present"
else
    say "missing: ${missing[*]}"
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif have sudo && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        say "not root and no password-less sudo; install them yourself with:"
        echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    if ! have apt-get; then
        say "apt-get not found (not Debian/Ubuntu?): install the equivalents of: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    say "installed: ${missing[*]}"
fi

# Rust is a prerequisite we do not install.
if have cargo; then
    say "cargo: $(cargo --version)"
elif [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    say "cargo is installed at $HOME/.cargo/bin/cargo but not on PATH:" >&2
    say "    export PATH=\"\$HOME/.cargo/bin:\$PATH\"   (or: . \"\$HOME/.cargo/env\")" >&2
    rc=1
else
    say "cargo not found: install Rust first (https://rustup.rs):" >&2
    say "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
    rc=1
fi
exit "$rc"
