#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps look unreachable to shellcheck 0.9
# Start a throw-away PostgreSQL and a redis-server with ./pgcache.so loaded,
# show the module at work with redis-cli, then wait for Ctrl-C and stop both.
# `make run` builds the module and runs this.
#
# Environment:
#   PG_URL=postgresql://user:pass@host:port/db
#             use that database instead of a throw-away cluster. sql/demo.sql
#             is loaded there only when neither `users` nor `products` exists.
#   PGCACHE_MODULE=path      module to load (default: ./pgcache.so)
#   PGCACHE_SERVER=valkey    run valkey-server (from .deps/valkey, see `make deps`)
#                            instead of redis-server
#   PGCACHE_SOURCE=replication
#                            invalidate by logical replication instead of triggers:
#                            the throw-away cluster gets wal_level = logical, the
#                            demo tables are published (pgcache_publish) instead of
#                            watched, and the module gets `invalidation_source
#                            replication`. With PG_URL your server is not changed:
#                            the script says what it lacks, and uses its own slot
#                            (pgcache_run_demo), dropped at exit. Default: notify.
#   PG_BINDIR=dir            PostgreSQL server binaries (default: pg_config --bindir,
#                            else the newest /usr/lib/postgresql/*/bin)
#   PGCACHE_RUN_NO_WAIT=1    stop everything after the demo instead of waiting
#   PGCACHE_STEP_TIMEOUT=30  seconds each demo command may take
#
# Everything lives in .run/ (reset at each start): .run/pg (the cluster),
# .run/pgsock (its unix socket), .run/redis (redis' dir), .run/*.log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN="$ROOT/.run"
MODULE=${PGCACHE_MODULE:-$ROOT/pgcache.so}
DB=pgcache_demo
EVENTS_CHANNEL=pg_cache_events
REDIS_LOG="$RUN/redis.log"
REDIS_PIDFILE="$RUN/redis.pid"
STEP_TIMEOUT=${PGCACHE_STEP_TIMEOUT:-30}
# The server binary and its process name (pid_is matches on it).
case "${PGCACHE_SERVER:-redis}" in
    redis) SERVER_BIN=redis-server ;;
    valkey) SERVER_BIN="$ROOT/.deps/valkey/bin/valkey-server" ;;
    *) echo "run.sh: PGCACHE_SERVER=$PGCACHE_SERVER: expected redis or valkey" >&2; exit 2 ;;
esac
SERVER_NAME=${SERVER_BIN##*/}
# How the module learns of changes: triggers + NOTIFY, or a logical replication slot.
case "${PGCACHE_SOURCE:-notify}" in
    notify | replication) SOURCE=${PGCACHE_SOURCE:-notify} ;;
    *) echo "run.sh: PGCACHE_SOURCE=$PGCACHE_SOURCE: expected notify (the default) or replication" >&2; exit 2 ;;
esac
# The module's defaults, except on your own server (PG_URL), where a slot of
# this script's own is created by the module and dropped again at exit.
PUBLICATION=pgcache
SLOT=pgcache
if [[ $SOURCE == replication && -n "${PG_URL:-}" ]]; then SLOT=pgcache_run_demo; fi

if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
say() { printf '%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'run.sh: %s\n' "$*" >&2; }

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# ---------------------------------------------------------------------------
# Helpers

# Run a PostgreSQL server binary: as the `postgres` system user when we are
# root (initdb and postgres refuse to run as root), directly otherwise.
as_pg() {
    if ((IS_ROOT)); then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

find_pg_bindir() {
    local d
    if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return; fi
    fi
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
    if [[ -n "$d" && -x "$d/initdb" ]]; then echo "$d"; return; fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
    return 1
}

port_in_use() {
    local port=$1
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$port" <<'PY' && return 1 || return 0
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
    elif command -v ss >/dev/null 2>&1; then
        [[ -n $(ss -Htln "sport = :$port" 2>/dev/null) ]]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
    fi
}

# A free TCP port on 127.0.0.1, not one of the ports given as arguments.
free_port() {
    local port i avoid
    for ((i = 0; i < 100; i++)); do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        for avoid in "$@"; do [[ $port == "$avoid" ]] && continue 2; done
        port_in_use "$port" || { echo "$port"; return 0; }
    done
    warn "could not find a free TCP port"
    return 1
}

pid_is() { # pid name: is pid alive and running `name`?
    local cmd
    [[ -n "$1" && -r "/proc/$1/cmdline" ]] || return 1
    cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *"$2"* ]]
}

# PGCACHE_SOURCE=replication on your own server (PG_URL): this script never
# changes a server's settings, so it says what is missing, and stops when the
# module could not stream.
check_replication_prerequisites() {
    local version wal slots senders keep role_ok todo=() advice=()
    pg_value() { "$PSQL" -X -tA -c "$1" "${PSQL_CONN[@]}" || die "query failed: $1"; }
    version=$(pg_value "SELECT current_setting('server_version_num')")
    ((version >= 130000)) || die "PGCACHE_SOURCE=replication needs PostgreSQL 13 or later (PG_URL is $version)"
    wal=$(pg_value "SHOW wal_level")
    slots=$(pg_value "SHOW max_replication_slots")
    senders=$(pg_value "SHOW max_wal_senders")
    keep=$(pg_value "SHOW max_slot_wal_keep_size")
    role_ok=$(pg_value "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user")
    [[ $wal == logical ]] || todo+=("ALTER SYSTEM SET wal_level = logical;            -- now $wal")
    ((slots > 0)) || todo+=("ALTER SYSTEM SET max_replication_slots = 10;     -- now $slots")
    ((senders > 0)) || todo+=("ALTER SYSTEM SET max_wal_senders = 10;           -- now $senders")
    if ((${#todo[@]})); then todo+=("-- then restart PostgreSQL: these settings need a restart"); fi
    [[ $role_ok == t ]] || todo+=("ALTER ROLE current_user REPLICATION;            -- the role of PG_URL")
    [[ $keep != -1 ]] || advice+=("ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();" \
        "-- now unlimited: a slot left behind keeps WAL until the disk is full")
    if ((${#todo[@]} + ${#advice[@]})); then
        warn "PGCACHE_SOURCE=replication: for your PostgreSQL (PG_URL), as a superuser:"
        if ((${#todo[@]})); then printf '    %s\n' "-- needed:" "${todo[@]}" >&2; fi
        if ((${#advice[@]})); then printf '    %s\n' "-- strongly recommended:" "${advice[@]}" >&2; fi
        warn "and in pg_hba.conf a line for the role: its replication=database connection matches"
        warn "ordinary database lines, not 'replication' lines. This script changes none of it."
    fi
    ((${#todo[@]} == 0)) || die "PostgreSQL (PG_URL) is not ready for logical replication"
    note "wal_level = logical, max_replication_slots = $slots, max_wal_senders = $senders," \
        "max_slot_wal_keep_size = $keep; the demo's own slot $SLOT is dropped at exit"
}

show_logs() {
    if [[ -s "$REDIS_LOG" ]]; then
        echo "---- last lines of $REDIS_LOG ----" >&2
        tail -n 30 "$REDIS_LOG" >&2
    fi
    if [[ -s "$RUN/redis.stdout" ]]; then
        echo "---- $RUN/redis.stdout ----" >&2
        tail -n 10 "$RUN/redis.stdout" >&2
    fi
    if [[ -n "${PG_LOG:-}" && -s "$PG_LOG" ]]; then
        echo "---- last lines of $PG_LOG ----" >&2
        tail -n 15 "$PG_LOG" >&2
    fi
}

die() {
    warn "FAILED: $*"
    show_logs
    exit 1
}

# ---------------------------------------------------------------------------
# Stopping (trap) and stale state from an earlier run

REDIS_PID=
SUB_PID=
PG_STARTED=0
DEMO_SLOT=0
CLEANED=0

stop_redis_pid() { # pid
    local pid=$1 i
    pid_is "$pid" "$SERVER_NAME" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        pid_is "$pid" "$SERVER_NAME" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop_pg() { # datadir mode
    [[ -f "$1/postmaster.pid" ]] || return 0
    as_pg "$PG_BIN/pg_ctl" -D "$1" -m "$2" -w -t 30 stop >/dev/null 2>&1 || true
}

# The slot the module created on your server (PG_URL) for this demo: a slot
# nobody reads keeps WAL without limit, so it goes when the demo does.
drop_demo_slot() {
    local i state
    for ((i = 0; i < 50; i++)); do
        state=$("$PSQL" -X -tA -c "SELECT active FROM pg_replication_slots WHERE slot_name = '$SLOT'" \
            "${PSQL_CONN[@]}" 2>/dev/null) || break
        [[ -z $state ]] && return 0
        # Active until the walsender of the stopped server notices.
        if [[ $state == f ]] && "$PSQL" -X -q -c "SELECT pg_drop_replication_slot('$SLOT')" \
            "${PSQL_CONN[@]}" >/dev/null 2>&1; then
            echo "dropped the replication slot $SLOT"
            return 0
        fi
        sleep 0.1
    done
    echo "run.sh: could not drop the replication slot $SLOT: drop it yourself with" \
        "SELECT pg_drop_replication_slot('$SLOT')" >&2
}

cleanup() {
    ((CLEANED)) && return 0
    CLEANED=1
    # Keep going whatever happens, and never re-enter: the terminal or pipe we
    # print to may be gone (SIGPIPE/SIGHUP).
    # A second Ctrl-C must not cut the stopping short (it is bounded anyway).
    set +e
    trap '' PIPE INT TERM HUP
    if [[ -n "$SUB_PID" ]]; then kill "$SUB_PID" 2>/dev/null || true; fi
    if [[ -n "$REDIS_PID" ]]; then
        echo "stopping $SERVER_NAME (pid $REDIS_PID)" 2>/dev/null
        stop_redis_pid "$REDIS_PID"
        wait "$REDIS_PID" 2>/dev/null || true
        rm -f "$REDIS_PIDFILE"
    fi
    if ((DEMO_SLOT)); then drop_demo_slot; fi
    if ((PG_STARTED)); then
        echo "stopping PostgreSQL ($PGDATA)" 2>/dev/null
        stop_pg "$PGDATA" fast
    fi
}

on_exit() {
    local rc=$?
    cleanup
    exit "$rc"
}
on_signal() {
    trap '' PIPE INT TERM HUP
    echo 2>/dev/null
    cleanup
    # Ctrl-C while waiting is the normal way out; earlier it is an interruption.
    if ((${WAITING:-0})); then exit 0; fi
    exit 130
}
trap on_exit EXIT
trap on_signal INT TERM HUP PIPE

# ---------------------------------------------------------------------------
# Preconditions

[[ -f "$MODULE" ]] || die "$MODULE not found: build it first with \`make\`"
command -v "$SERVER_BIN" >/dev/null 2>&1 || die "$SERVER_BIN not found (run scripts/install-deps.sh)"
command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found (run scripts/install-deps.sh)"
PG_BIN=$(find_pg_bindir) || die "PostgreSQL server binaries not found (run scripts/install-deps.sh)"
PSQL="$PG_BIN/psql"
[[ -x "$PSQL" ]] || PSQL=$(command -v psql) || die "psql not found"
export PGCONNECT_TIMEOUT=5 PSQLRC=/dev/null

mkdir -p "$RUN"

# Stale redis-server of an earlier run (killed without cleanup)?
if [[ -f "$REDIS_PIDFILE" ]]; then
    old=$(cat "$REDIS_PIDFILE" 2>/dev/null || true)
    if pid_is "$old" "$SERVER_NAME"; then
        note "stopping $SERVER_NAME left over from an earlier run (pid $old)"
        stop_redis_pid "$old"
    fi
    rm -f "$REDIS_PIDFILE"
fi
rm -rf "$RUN/redis" "$REDIS_LOG" "$RUN/redis.stdout" "$RUN/events.txt"
mkdir -p "$RUN/redis"

# ---------------------------------------------------------------------------
# PostgreSQL

# The cluster goes in .run/pg. When root, the postgres user runs it and must
# be able to reach that folder; if it cannot (e.g. a repo under /root), the
# cluster goes to a fixed folder under /tmp instead.
PGBASE="$RUN"
if ((IS_ROOT)); then
    if id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$RUN"; then
        PGBASE="/tmp/pgcache-run-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
        note "the postgres user cannot reach $RUN; using $PGBASE for the cluster"
    fi
fi
PGDATA="$PGBASE/pg"
PGSOCK="$PGBASE/pgsock"
# A unix socket path is limited to ~107 bytes.
if ((${#PGSOCK} > 80)); then
    PGSOCK="/tmp/pgcache-sock-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
fi
PG_LOG="$PGBASE/postgres.log"

# An old cluster (a killed run, or just the previous one): stop it and wipe.
if [[ -f "$PGDATA/postmaster.pid" ]]; then
    note "stopping PostgreSQL left over from an earlier run"
    stop_pg "$PGDATA" immediate
fi

if [[ -n "${PG_URL:-}" ]]; then
    say "Using your PostgreSQL: PG_URL (no throw-away cluster)"
    PSQL_CONN=("$PG_URL")
    "$PSQL" -X -q -c 'SELECT 1' "${PSQL_CONN[@]}" >/dev/null || die "cannot connect to PG_URL"
    has_users=$("$PSQL" -X -tA -c "SELECT to_regclass('users') IS NOT NULL" "${PSQL_CONN[@]}")
    has_products=$("$PSQL" -X -tA -c "SELECT to_regclass('products') IS NOT NULL" "${PSQL_CONN[@]}")
    if [[ $has_users == f && $has_products == f ]]; then
        note "no users/products tables there: loading sql/demo.sql"
        "$PSQL" -X -q -v ON_ERROR_STOP=1 -f "$ROOT/sql/demo.sql" "${PSQL_CONN[@]}" >/dev/null \
            || die "loading sql/demo.sql failed"
        has_users=t has_products=t
    else
        note "found an existing users or products table: NOT loading sql/demo.sql"
        note "(it would drop them); the demo reads whatever rows you have"
    fi
    if [[ $SOURCE == replication ]]; then check_replication_prerequisites; fi
else
    if ((IS_ROOT)) && ! id postgres >/dev/null 2>&1; then
        die "running as root needs the 'postgres' system user (install postgresql)"
    fi
    rm -rf "$PGDATA" "$PGSOCK" "$PG_LOG"
    mkdir -p "$PGBASE" "$PGSOCK"
    touch "$PG_LOG"
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    if ((IS_ROOT)); then
        chown postgres: "$PGSOCK" "$PG_LOG" "$PGDATA"
        if [[ $PGBASE != "$RUN" ]]; then chown postgres: "$PGBASE"; fi
    fi

    if [[ $SOURCE == replication ]]; then
        pg_major=$("$PG_BIN/postgres" -V | sed -n 's/^[^0-9]*\([0-9][0-9]*\).*/\1/p')
        [[ -n $pg_major ]] || die "cannot tell the version of $PG_BIN/postgres"
        ((pg_major >= 13)) || die "PGCACHE_SOURCE=replication needs PostgreSQL 13 or later ($PG_BIN is $pg_major; see PG_BINDIR)"
    fi
    say "Creating a throw-away PostgreSQL cluster in ${PGDATA#"$ROOT"/} ($PG_BIN)"
    as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C --no-sync \
        >"$RUN/initdb.log" 2>&1 || { cat "$RUN/initdb.log" >&2; die "initdb failed"; }

    PG_PORT=
    for attempt in 1 2 3; do
        PG_PORT=$(free_port) || die "no free port for PostgreSQL"
        {
            echo "# added by scripts/run.sh"
            echo "listen_addresses = '127.0.0.1'"
            echo "port = $PG_PORT"
            echo "unix_socket_directories = '$PGSOCK'"
            echo "fsync = off"
            if [[ $SOURCE == replication ]]; then
                # Logical decoding (these three need a restart on a real server),
                # and a bound on the WAL an abandoned slot may keep.
                echo "wal_level = logical"
                echo "max_replication_slots = 10"
                echo "max_wal_senders = 10"
                echo "max_slot_wal_keep_size = '1GB'"
            fi
        } >>"$PGDATA/postgresql.auto.conf"
        PG_STARTED=1
        # setsid: its own session, so a Ctrl-C reaches only this script, which stops it.
        if as_pg setsid -w "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w -t 30 start >/dev/null; then
            break
        fi
        PG_STARTED=0
        ((attempt < 3)) || die "PostgreSQL did not start"
        note "PostgreSQL did not start on port $PG_PORT; trying another port"
    done
    note "PostgreSQL listening on 127.0.0.1:$PG_PORT (socket dir $PGSOCK)"

    PSQL_BASE=(-h 127.0.0.1 -p "$PG_PORT" -U postgres)
    "$PSQL" -X -q "${PSQL_BASE[@]}" -d postgres -c "CREATE DATABASE $DB" >/dev/null \
        || die "CREATE DATABASE $DB failed"
    PSQL_CONN=("${PSQL_BASE[@]}" -d "$DB")
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -f "$ROOT/sql/demo.sql" "${PSQL_CONN[@]}" >/dev/null \
        || die "loading sql/demo.sql failed"
    note "database $DB created, sql/demo.sql loaded"
    has_users=t has_products=t
fi

if [[ $SOURCE == replication ]]; then
    # The publication exists before the module starts streaming from it.
    say "Publish the demo tables: sql/pgcache.sql, then SELECT pgcache_publish(...) (no triggers)"
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -f "$ROOT/sql/pgcache.sql" "${PSQL_CONN[@]}" >/dev/null \
        || die "loading sql/pgcache.sql failed"
    for t in users products; do
        [[ $t == users && $has_users == t || $t == products && $has_products == t ]] || continue
        "$PSQL" -X -q -v ON_ERROR_STOP=1 -c "SELECT pgcache_publish('$t', '$PUBLICATION')" "${PSQL_CONN[@]}" >/dev/null \
            || die "pgcache_publish('$t') failed"
    done
    note "wal_level = $("$PSQL" -X -tA -c 'SHOW wal_level' "${PSQL_CONN[@]}")," \
        "publication $PUBLICATION: $("$PSQL" -X -tA -c "SELECT string_agg(schemaname || '.' || tablename, ', ' ORDER BY 1) FROM pg_publication_tables WHERE pubname = '$PUBLICATION'" "${PSQL_CONN[@]}")"
fi

# ---------------------------------------------------------------------------
# Redis with the module

if [[ -n "${PG_URL:-}" ]]; then
    MODULE_ARGS=(pg_url "$PG_URL")
else
    MODULE_ARGS=(pg_host 127.0.0.1 pg_port "$PG_PORT" pg_database "$DB" pg_user postgres)
fi
REPL_ARGS=()
if [[ $SOURCE == replication ]]; then
    REPL_ARGS=(invalidation_source replication)
    # Only where they differ from the module's defaults (pgcache, pgcache).
    [[ $SLOT == pgcache ]] || REPL_ARGS+=(replication_slot "$SLOT")
    [[ $PUBLICATION == pgcache ]] || REPL_ARGS+=(replication_publication "$PUBLICATION")
    MODULE_ARGS+=("${REPL_ARGS[@]}")
    [[ -z "${PG_URL:-}" ]] || DEMO_SLOT=1
fi

for attempt in 1 2 3; do
    REDIS_PORT=$(free_port "${PG_PORT:-}") || die "no free port for Redis"
    say "Starting $SERVER_NAME on 127.0.0.1:$REDIS_PORT with ${MODULE#"$ROOT"/}"
    if [[ $SOURCE == replication ]]; then
        note "invalidation by logical replication: slot $SLOT, publication $PUBLICATION" \
            "(module arguments: ... ${REPL_ARGS[*]})"
    fi
    # Own session: a Ctrl-C reaches this script, which then stops the servers in order.
    # (The module path is absolute: redis changes into --dir before loading modules.)
    setsid "$SERVER_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 \
        --save "" --appendonly no --dir "$RUN/redis" --logfile "$REDIS_LOG" \
        --loadmodule "$MODULE" "${MODULE_ARGS[@]}" </dev/null >"$RUN/redis.stdout" 2>&1 &
    REDIS_PID=$!
    echo "$REDIS_PID" >"$REDIS_PIDFILE"
    up=0
    for ((i = 0; i < 100; i++)); do
        if [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]]; then up=1; break; fi
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.1
    done
    # Every redis-cli call is bounded: a module that hangs must not hang the script.
    if ((up)); then R=(timeout "$STEP_TIMEOUT" redis-cli -p "$REDIS_PORT"); break; fi
    if kill -0 "$REDIS_PID" 2>/dev/null; then
        die "$SERVER_NAME (pid $REDIS_PID) does not answer PING"
    fi
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=
    # A port taken meanwhile is worth another try; a module that fails to load is not.
    if ((attempt < 3)) && grep -q "Address already in use" "$REDIS_LOG" 2>/dev/null; then
        note "port $REDIS_PORT was taken; trying another"
        continue
    fi
    die "$SERVER_NAME exited at start (module load failure?)"
done
# (MODULE LIST also shows the load arguments, a PG_URL password included: not printed.)
"${R[@]}" MODULE LIST | grep -qx pgcache || die "MODULE LIST does not show the module 'pgcache'"
note "module 'pgcache' loaded"
if [[ $SOURCE == replication ]]; then
    # Entries are served (and fills cached) once the stream has caught up.
    trusted=0
    for ((i = 0; i < 10 * STEP_TIMEOUT; i++)); do
        if "${R[@]}" INFO pgcache | grep -q '^pgcache_entries_trusted:1'; then trusted=1; break; fi
        sleep 0.1
    done
    state=$("${R[@]}" INFO pgcache | tr -d '\r' | sed -n 's/^pgcache_replication://p')
    if ((trusted)); then
        note "replication stream ${state:-up}: entries are served from the cache"
    else
        warn "replication not caught up within $STEP_TIMEOUT s (${state:-no state}): reads go to PostgreSQL"
    fi
fi

# ---------------------------------------------------------------------------
# The demo

# Print a command as one could paste it into a shell.
show_cmd() {
    local a line="redis-cli -p $REDIS_PORT"
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_.:@/=-]+$ ]]; then
            line+=" $a"
        else
            line+=" '${a//\'/\'\\\'\'}'"
        fi
    done
    printf '    $ %s\n' "$line"
}

# Run one command, print its reply indented, fail on an error reply
# (redis-cli exits 0 on error replies, so look at the reply itself).
step() { # label, command...
    local label=$1 out
    shift
    echo
    say "$label"
    show_cmd "$@"
    local rc=0
    out=$("${R[@]}" "$@" 2>&1) || rc=$?
    if ((rc == 124)); then
        die "no reply within $STEP_TIMEOUT s (PGCACHE_STEP_TIMEOUT)"
    elif ((rc != 0)); then
        printf '%s\n' "$out" | sed 's/^/    /'
        die "redis-cli failed"
    fi
    if [[ -z "$out" ]]; then
        echo "    (nil)"
    else
        printf '%s\n' "$out" | sed 's/^/    /'
    fi
    if head -n 1 <<<"$out" | grep -Eq '^[A-Z][A-Z_]+ '; then
        die "the command answered an error"
    fi
}

if [[ -z $("${R[@]}" COMMAND INFO PGCACHE.READ | tr -d '[:space:]') ]]; then
    die "the loaded module has no PGCACHE.READ command yet"
fi

# Watch the events channel in the background while the demo runs.
redis-cli -p "$REDIS_PORT" SUBSCRIBE "$EVENTS_CHANNEL" >"$RUN/events.txt" 2>&1 &
SUB_PID=$!
for ((i = 0; i < 50; i++)); do
    [[ $("${R[@]}" PUBSUB NUMSUB "$EVENTS_CHANNEL" | tail -n 1) == 1 ]] && break
    sleep 0.1
done

USER_KEY='pg_cache:users:{"id":1}'
if [[ $has_users == t ]]; then
    step 'READ users id 1: a MISS, the module fetches the row from PostgreSQL and caches it' \
        PGCACHE.READ users '{"id":1}'
    step 'The same READ again: a HIT, answered from Redis without asking PostgreSQL' \
        PGCACHE.READ users '{"id":1}'
    step 'The cache entry is a plain Redis string; its TTL comes from default_ttl (3600 s)' \
        TTL "$USER_KEY"
    step 'MULTIREAD users 1, 2, 99: 1 is a hit, 2 a miss (fetched), 99 does not exist (null)' \
        PGCACHE.MULTIREAD users '[{"id":1},{"id":2},{"id":99}]'
fi
if [[ $has_products == t ]]; then
    step 'READ products with a composite key (category, product_id): a miss, fetched' \
        PGCACHE.READ products '{"category":"electronics","product_id":1}'
fi
if [[ $has_users == t ]]; then
    step 'INVALIDATE users id 1: drops the entry (the next READ will be a miss again)' \
        PGCACHE.INVALIDATE users '{"id":1}'
    step 'The entry is gone' EXISTS "$USER_KEY"
fi
if [[ $has_users == t && $SOURCE == notify ]]; then
    # Automatic invalidation: triggers from sql/pgcache.sql notify the module.
    echo
    say "Watch users in PostgreSQL: sql/pgcache.sql, then SELECT pgcache_watch('users')"
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -f "$ROOT/sql/pgcache.sql" "${PSQL_CONN[@]}" >/dev/null \
        || die "loading sql/pgcache.sql failed"
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -c "SELECT pgcache_watch('users')" "${PSQL_CONN[@]}" >/dev/null \
        || die "pgcache_watch failed"
    step 'READ users id 2: cached' PGCACHE.READ users '{"id":2}'
    echo
    say "UPDATE users SET name = 'Bob B.' WHERE id = 2, in PostgreSQL"
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -c "UPDATE users SET name = 'Bob B.' WHERE id = 2" "${PSQL_CONN[@]}" >/dev/null \
        || die "UPDATE failed"
    sleep 0.3
    step 'The trigger notified the module: the entry is gone' EXISTS 'pg_cache:users:{"id":2}'
    step 'READ users id 2 again: a miss, with the new name' PGCACHE.READ users '{"id":2}'
fi
if [[ $has_users == t && $SOURCE == replication ]]; then
    # Automatic invalidation: the module decodes the change from its slot.
    step 'READ users id 2: cached' PGCACHE.READ users '{"id":2}'
    echo
    say "UPDATE users SET name = 'Bob B.' WHERE id = 2, in PostgreSQL (users is published, it has no trigger)"
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -c "UPDATE users SET name = 'Bob B.' WHERE id = 2" "${PSQL_CONN[@]}" >/dev/null \
        || die "UPDATE failed"
    for ((i = 0; i < 10 * STEP_TIMEOUT; i++)); do
        [[ $("${R[@]}" EXISTS 'pg_cache:users:{"id":2}') == 0 ]] && break
        sleep 0.1
    done
    step "The module streamed the UPDATE from slot $SLOT: the entry is gone" EXISTS 'pg_cache:users:{"id":2}'
    step 'READ users id 2 again: a miss, with the new name' PGCACHE.READ users '{"id":2}'
fi
step 'STATS: the module counters' PGCACHE.STATS

sleep 0.3
kill "$SUB_PID" 2>/dev/null || true
wait "$SUB_PID" 2>/dev/null || true
SUB_PID=
echo
say "Events published on $EVENTS_CHANNEL during the demo"
grep '^{' "$RUN/events.txt" | sed 's/^/    /' || note "(none received)"

# ---------------------------------------------------------------------------
# Wait for Ctrl-C

echo
say "pgcache is running"
note "Redis:      redis-cli -p $REDIS_PORT        (try: PGCACHE.READ users '{\"id\":3}')"
if [[ -n "${PG_URL:-}" ]]; then
    note "PostgreSQL: psql \"\$PG_URL\""
else
    note "PostgreSQL: psql -h 127.0.0.1 -p $PG_PORT -U postgres $DB"
fi
note "Events:     redis-cli -p $REDIS_PORT SUBSCRIBE $EVENTS_CHANNEL"
if [[ $SOURCE == replication ]]; then
    note "Slot:       SELECT * FROM pg_replication_slots WHERE slot_name = '$SLOT'"
fi
note "Redis log:  ${REDIS_LOG#"$ROOT"/}"

if [[ "${PGCACHE_RUN_NO_WAIT:-}" == 1 ]]; then
    note "PGCACHE_RUN_NO_WAIT=1: stopping now"
    exit 0
fi
note "Press Ctrl-C to stop both servers."
WAITING=1
while kill -0 "$REDIS_PID" 2>/dev/null; do
    sleep 1 &
    wait $! || true
done
WAITING=0
REDIS_PID=
die "$SERVER_NAME exited unexpectedly"
