#!/usr/bin/env python3
"""pgcache from Python with redis-py: the cache events on pubsub.

Subscribes to the events channel, then on a second connection invalidates,
reads (a miss) and reads again (a hit) users id 1 of the demo schema
(sql/demo.sql), printing each event as it arrives. Then it waits for an
UPDATE of that row in PostgreSQL: the triggers of sql/pgcache.sql
(`SELECT pgcache_watch('users')`, which `make run` does) make the module drop
the entry and publish a cache_invalidate with "source":"notify". Run the
UPDATE yourself when it asks, e.g. with the psql line `make run` prints:

    REDIS_URL=redis://127.0.0.1:<port>/0 PYTHONPATH=.deps/python python3 examples/python/events.py
    psql -h 127.0.0.1 -p <pg port> -U postgres pgcache_demo \\
        -c "UPDATE users SET name = 'Alice A.' WHERE id = 1"

Environment: REDIS_URL (default redis://127.0.0.1:6379/0), EVENTS_CHANNEL
(the module's events_channel, default pg_cache_events), TIMEOUT_SECONDS
(default 30: how long to wait for each event), WAIT_FOR_UPDATE (default 1;
0 skips the UPDATE step). It never waits longer than that: it exits 0 once
it has seen every event it expects, 1 when one does not come in time.
"""

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
CHANNEL = os.environ.get("EVENTS_CHANNEL", "pg_cache_events")
TIMEOUT = float(os.environ.get("TIMEOUT_SECONDS", "30"))
WAIT_FOR_UPDATE = os.environ.get("WAIT_FOR_UPDATE", "1") != "0"
KEY = {"id": 1}


class Failed(Exception):
    """What the example saw was not what it expected."""


def next_event(sub, wanted, what):
    """Print events until one of users id 1 for which `wanted(event)` holds;
    Failed after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failed(f"no {what} event on {CHANNEL} within {TIMEOUT:g} s")
        message = sub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0))
        if message is None:
            continue
        event = json.loads(message["data"])
        ours = event.get("table") == "users" and event.get("key") == KEY
        extra = "".join(f" {name}={event[name]}" for name in ("source", "operation")
                        if name in event)
        print(f"event: {event['type']} {event.get('table')} "
              f"{json.dumps(event.get('key'))}{extra}" + ("" if ours else "  (not ours)"))
        if ours and wanted(event):
            return event


def run():
    options = dict(decode_responses=True, socket_connect_timeout=5, socket_timeout=TIMEOUT)
    r = redis.Redis.from_url(REDIS_URL, **options)
    try:
        r.execute_command("PGCACHE.STATS")
    except redis.exceptions.ResponseError as e:
        raise Failed(f"PGCACHE.STATS failed ({e}): is the pgcache module loaded "
                     f"in the Redis at {REDIS_URL}?") from e

    # A subscribed connection only receives: commands go through `r`.
    sub = r.pubsub()
    sub.subscribe(CHANNEL)
    confirmed = sub.get_message(timeout=TIMEOUT)
    if not confirmed or confirmed["type"] != "subscribe":
        raise Failed(f"no subscribe confirmation for {CHANNEL}: {confirmed!r}")
    print(f"subscribed to {CHANNEL}")

    key = json.dumps(KEY)
    r.execute_command("PGCACHE.INVALIDATE", "users", key)
    next_event(sub, lambda e: e["type"] == "cache_invalidate" and e.get("source") == "command",
               "cache_invalidate (source command)")
    r.execute_command("PGCACHE.READ", "users", key)
    next_event(sub, lambda e: e["type"] == "cache_miss", "cache_miss")
    r.execute_command("PGCACHE.READ", "users", key)
    next_event(sub, lambda e: e["type"] == "cache_hit", "cache_hit")

    if WAIT_FOR_UPDATE:
        print(f"waiting up to {TIMEOUT:g} s for an UPDATE of users id 1 in PostgreSQL, e.g.: "
              "UPDATE users SET name = 'Alice A.' WHERE id = 1")
        event = next_event(sub, lambda e: e["type"] == "cache_invalidate"
                           and e.get("source") == "notify", "cache_invalidate (source notify)")
        print(f"the {event.get('operation')} in PostgreSQL dropped the entry")
        row = json.loads(r.execute_command("PGCACHE.READ", "users", key))
        next_event(sub, lambda e: e["type"] == "cache_miss", "cache_miss")
        print(f"READ users {key} -> a miss again, the new row: name {row['name']!r}")
    sub.close()


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
    print("OK: events.py done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
