#!/usr/bin/env python3
"""pgcache on Redis Cluster with redis-py's RedisCluster (the demo schema:
table `users`, ids 1 to 5; sql/demo.sql).

    REDIS_CLUSTER=127.0.0.1:7000 PYTHONPATH=.deps/python python3 examples/python/cluster.py
"""

import json
import os

from redis.cluster import ClusterNode, RedisCluster

host, port = os.environ.get("REDIS_CLUSTER", "127.0.0.1:7000").rsplit(":", 1)
rc = RedisCluster(startup_nodes=[ClusterNode(host, int(port))], decode_responses=True)


def pk(**columns):
    # The canonical spelling of integer, text and boolean keys: compact,
    # members sorted by name, non-ASCII as UTF-8. For other key types ask
    # PGCACHE.CANONICAL.
    return json.dumps(columns, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


# READ, WRITE and INVALIDATE are routed by their pk, like GET by its key.
row = json.loads(rc.execute_command("PGCACHE.READ", "users", pk(id=1)))
print("READ users id 1:", row)
rc.execute_command("PGCACHE.INVALIDATE", "users", pk(id=1))

# Keyless commands name their nodes (ClusterNode objects: redis-py 8.1
# ignores flags such as RedisCluster.RANDOM for module commands).
canonical = rc.execute_command("PGCACHE.CANONICAL", "users", '{"id":"0002"}',
                               target_nodes=rc.get_random_node())
print('canonical form of {"id":"0002"}:', canonical)

# MULTIREAD: one call per node, each with the pks of that node, so every
# row is cached where its slot lives.
by_node = {}
for i in range(1, 6):
    key = pk(id=i)
    by_node.setdefault(rc.get_node_from_key(key).name, []).append(key)
rows = {}
for name, keys in by_node.items():
    reply = rc.execute_command("PGCACHE.MULTIREAD", "users", "[" + ",".join(keys) + "]",
                               target_nodes=rc.get_node(node_name=name))
    rows.update(zip(keys, json.loads(reply)))
print("MULTIREAD users ids 1-5 on", len(by_node), "nodes:", [rows[pk(id=i)]["name"] for i in range(1, 6)])

stats = rc.execute_command("PGCACHE.STATS", target_nodes=rc.get_primaries())
print("hits per primary:", sorted(json.loads(s)["hits"] for s in stats.values()))

assert row["id"] == 1 and canonical == '{"id":2}' and len(rows) == 5
