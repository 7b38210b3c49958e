#!/usr/bin/env python3
"""pgcache from Python with redis-py: one command at a time.

READ (a miss, then a hit), MULTIREAD, WRITE, INVALIDATE, an error reply and
PGCACHE.STATS, against the demo schema of `make run` (sql/demo.sql: table
`users`, ids 1 to 5).

    REDIS_URL=redis://127.0.0.1:<port>/0 PYTHONPATH=.deps/python python3 examples/python/plain.py

Environment: REDIS_URL (default redis://127.0.0.1:6379/0), TIMEOUT_SECONDS
(default 30: how long one command may take). Exits 0 when everything it saw
was as expected, 1 with a message saying what was not.
"""

import json
import os
import sys

try:
    import redis
except ImportError:
    sys.exit("FAILED: redis-py is not installed: run `make deps` and set "
             "PYTHONPATH=.deps/python (or `pip install redis`)")

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TIMEOUT = float(os.environ.get("TIMEOUT_SECONDS", "30"))


class Failed(Exception):
    """What the example saw was not what it expected."""


def expect(cond, what):
    if not cond:
        raise Failed(what)


def pk(**columns):
    """A primary key as the JSON text pgcache takes."""
    return json.dumps(columns)


def stats(r):
    # PGCACHE.STATS answers one JSON object (a string), not a RESP map.
    return json.loads(r.execute_command("PGCACHE.STATS"))


def delta(before, after, name):
    return after[name] - before[name]


def run():
    # decode_responses=True: replies are str, not bytes.
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True,
                             socket_connect_timeout=5, socket_timeout=TIMEOUT)
    try:
        s = stats(r)
    except redis.exceptions.ResponseError as e:
        raise Failed(f"PGCACHE.STATS failed ({e}): is the pgcache module loaded "
                     f"in the Redis at {REDIS_URL}?") from e
    print(f"connected to {REDIS_URL}: pgcache {s.get('version')}, "
          f"trust_state {s['trust_state']}")

    # Start from a cold entry, so the first READ is a miss.
    reply = r.execute_command("PGCACHE.INVALIDATE", "users", pk(id=1))
    expect(reply == "OK", f"INVALIDATE answered {reply!r}")
    print("INVALIDATE users {\"id\": 1} -> OK")

    # READ: a miss (the module queries PostgreSQL), then a hit (from Redis).
    before = stats(r)
    text = r.execute_command("PGCACHE.READ", "users", pk(id=1))
    expect(text is not None, "READ users id 1 answered nil: is sql/demo.sql loaded?")
    alice = json.loads(text)      # the row, as row_to_json renders it
    middle = stats(r)
    expect(delta(before, middle, "misses") >= 1,
           f"the first READ was not a miss: {middle}")
    print(f"READ users {{\"id\": 1}} -> miss, fetched from PostgreSQL: {text}")

    again = r.execute_command("PGCACHE.READ", "users", pk(id=1))
    after = stats(r)
    expect(again == text, f"the second READ answered {again!r}, not {text!r}")
    expect(delta(middle, after, "hits") >= 1,
           f"the second READ was not a hit (trust_state {after['trust_state']}): {after}")
    ttl = r.ttl('pg_cache:users:{"id":1}')   # the entry is a plain Redis string
    print(f"READ users {{\"id\": 1}} -> hit, from Redis: name {alice['name']!r}, "
          f"entry TTL {ttl} s")

    # A key with no row: nil, which redis-py gives as None.
    missing = r.execute_command("PGCACHE.READ", "users", pk(id=99))
    expect(missing is None, f"READ users id 99 answered {missing!r}")
    print("READ users {\"id\": 99} -> None (no such row)")

    # MULTIREAD: one JSON array, aligned with the keys; null where no row.
    rows = json.loads(r.execute_command(
        "PGCACHE.MULTIREAD", "users", json.dumps([{"id": 1}, {"id": 2}, {"id": 99}])))
    expect(len(rows) == 3 and rows[0]["id"] == 1 and rows[1]["id"] == 2 and rows[2] is None,
           f"MULTIREAD answered {rows!r}")
    print(f"MULTIREAD users [1, 2, 99] -> {[row and row['name'] for row in rows]}")

    # WRITE stores a value in the cache only (PostgreSQL is not written);
    # the next READ is a hit that answers it.
    frank = {"id": 6, "name": "Frank", "email": "frank@example.com"}
    reply = r.execute_command("PGCACHE.WRITE", "users", pk(id=6), json.dumps(frank), 60)
    expect(reply == "OK", f"WRITE answered {reply!r}")
    cached = json.loads(r.execute_command("PGCACHE.READ", "users", pk(id=6)))
    expect(cached == frank, f"READ after WRITE answered {cached!r}")
    print(f"WRITE users {{\"id\": 6}} -> OK; READ -> {cached['name']!r} from the cache")

    # INVALIDATE drops it: the next READ asks PostgreSQL, which has no row 6.
    reply = r.execute_command("PGCACHE.INVALIDATE", "users", pk(id=6))
    expect(reply == "OK", f"INVALIDATE answered {reply!r}")
    gone = r.execute_command("PGCACHE.READ", "users", pk(id=6))
    expect(gone is None, f"READ after INVALIDATE answered {gone!r}")
    print("INVALIDATE users {\"id\": 6} -> OK; READ -> None (PostgreSQL has no row 6)")

    # Errors are error replies: redis-py raises ResponseError (its text
    # without the "ERR " prefix).
    try:
        r.execute_command("PGCACHE.READ", "nosuch", pk(id=1))
    except redis.exceptions.ResponseError as e:
        expect("unknown table 'nosuch'" in str(e), f"unexpected error text: {e}")
        print(f"READ nosuch -> ResponseError: {e}")
    else:
        raise Failed("READ of an unknown table did not fail")
    try:
        r.execute_command("PGCACHE.READ", "users", '{"id": "one"}')
    except redis.exceptions.ResponseError as e:
        print(f"READ users {{\"id\": \"one\"}} -> ResponseError: {e}")
    else:
        raise Failed("READ with a non-integer id did not fail")

    end = stats(r)
    print(f"STATS: hits +{delta(before, end, 'hits')}, misses +{delta(before, end, 'misses')}, "
          f"PostgreSQL queries +{delta(before, end, 'pg_queries')}, "
          f"writes +{delta(before, end, 'writes')}, "
          f"invalidations +{delta(before, end, 'invalidations')}, "
          f"listener {end['listener']}")


def main():
    sys.stdout.reconfigure(line_buffering=True)
    try:
        run()
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except redis.exceptions.ConnectionError as e:
        print(f"FAILED: cannot talk to Redis at {REDIS_URL}: {e}", file=sys.stderr)
        return 1
    except redis.exceptions.RedisError as e:
        print(f"FAILED: unexpected Redis error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("OK: plain.py done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
