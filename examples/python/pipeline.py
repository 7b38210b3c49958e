#!/usr/bin/env python3
"""pgcache from Python with redis-py: many commands in one round trip.

A pipeline (transaction=False) of 100 PGCACHE.READs of the demo `users`
(sql/demo.sql, ids 1 to 5), one of a missing row and one that fails, sent
together and answered in order; then why a transaction pipeline
(redis-py's default, MULTI/EXEC) is the wrong tool for reads through pgcache.

    REDIS_URL=redis://127.0.0.1:<port>/0 PYTHONPATH=.deps/python python3 examples/python/pipeline.py

Environment: REDIS_URL (default redis://127.0.0.1:6379/0), TIMEOUT_SECONDS
(default 30). Exits 0 when everything it saw was as expected, 1 otherwise.
"""

import collections
import json
import os
import sys
import time

try:
    import redis
except ImportError:
    sys.exit("FAILED: redis-py is not installed: run `make deps` and set "
             "PYTHONPATH=.deps/python (or `pip install redis`)")

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TIMEOUT = float(os.environ.get("TIMEOUT_SECONDS", "30"))
IDS = [1, 2, 3, 4, 5]
READS = 100


class Failed(Exception):
    """What the example saw was not what it expected."""


def expect(cond, what):
    if not cond:
        raise Failed(what)


def stats(r):
    return json.loads(r.execute_command("PGCACHE.STATS"))


def run():
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True,
                             socket_connect_timeout=5, socket_timeout=TIMEOUT)
    try:
        before = stats(r)
    except redis.exceptions.ResponseError as e:
        raise Failed(f"PGCACHE.STATS failed ({e}): is the pgcache module loaded "
                     f"in the Redis at {REDIS_URL}?") from e
    print(f"connected to {REDIS_URL}: trust_state {before['trust_state']}")

    # transaction=False: the commands go out together, but each runs on its
    # own, as if sent one by one. A miss blocks this connection until its row
    # is in, then the next command runs: repeated keys are hits.
    pipe = r.pipeline(transaction=False)
    for i in IDS:
        pipe.execute_command("PGCACHE.INVALIDATE", "users", json.dumps({"id": i}))
    for n in range(READS):
        pipe.execute_command("PGCACHE.READ", "users", json.dumps({"id": IDS[n % len(IDS)]}))
    pipe.execute_command("PGCACHE.READ", "users", json.dumps({"id": 99}))
    pipe.execute_command("PGCACHE.READ", "nosuch", json.dumps({"id": 1}))
    started = time.monotonic()
    # raise_on_error=False: an error reply comes back in its place, as an
    # exception object, instead of being raised (the others are kept).
    replies = pipe.execute(raise_on_error=False)
    ms = (time.monotonic() - started) * 1000
    after = stats(r)
    print(f"pipeline of {len(replies)} commands answered in {ms:.1f} ms")

    invalidated, reads, missing, error = (replies[:len(IDS)], replies[len(IDS):-2],
                                          replies[-2], replies[-1])
    expect(invalidated == ["OK"] * len(IDS), f"INVALIDATE replies: {invalidated!r}")
    names = collections.Counter()
    for n, text in enumerate(reads):
        expect(isinstance(text, str), f"READ #{n} answered {text!r}")
        row = json.loads(text)
        expect(row["id"] == IDS[n % len(IDS)], f"READ #{n} answered row {row!r}")
        names[row["name"]] += 1
    print(f"{len(reads)} READs -> {len(reads)} rows: "
          + ", ".join(f"{name} x{count}" for name, count in names.items()))
    expect(missing is None, f"READ users id 99 answered {missing!r}")
    print("READ users {\"id\": 99} -> None (no such row)")
    expect(isinstance(error, redis.exceptions.ResponseError)
           and "unknown table 'nosuch'" in str(error), f"READ nosuch answered {error!r}")
    print(f"READ nosuch -> {type(error).__name__}: {error}")

    misses = after["misses"] - before["misses"]
    hits = after["hits"] - before["hits"]
    print(f"STATS: misses +{misses}, hits +{hits}, "
          f"PostgreSQL queries +{after['pg_queries'] - before['pg_queries']}")
    expect(misses >= len(IDS) + 1, f"expected at least {len(IDS) + 1} misses: {after}")
    expect(hits >= READS - len(IDS),
           f"expected at least {READS - len(IDS)} hits "
           f"(trust_state {after['trust_state']}): {after}")

    # r.pipeline() is a transaction (MULTI/EXEC) unless transaction=False.
    # Inside MULTI a client cannot wait for PostgreSQL: hits are answered,
    # a miss is an error reply (and starts no fill).
    tx = r.pipeline()
    tx.execute_command("PGCACHE.READ", "users", json.dumps({"id": 1}))    # cached above
    tx.execute_command("PGCACHE.READ", "users", json.dumps({"id": 99}))   # a miss
    hit, refused = tx.execute(raise_on_error=False)
    expect(isinstance(hit, str) and json.loads(hit)["id"] == 1,
           f"a hit inside MULTI answered {hit!r}")
    expect(isinstance(refused, redis.exceptions.ResponseError)
           and "cannot wait for PostgreSQL here" in str(refused),
           f"a miss inside MULTI answered {refused!r}")
    print("MULTI/EXEC: the hit is answered; the miss -> "
          f"{type(refused).__name__}: {str(refused).split(' (')[0]}")


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
    print("OK: pipeline.py done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
