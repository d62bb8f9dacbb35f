"""`kvrelay store stats`: what a Redis page store holds: keys, bytes, tenants, and orphans.

    kvrelay store stats --store redis://127.0.0.1:6379/0 [--prefix kvrelay] [--json] [--delete-orphans]

What the key kinds are and what counts as an orphan: kvrelay.store.redis_stats, which scans.
Orphans are harmless to requests and normally expire on their own; `--delete-orphans` removes those
found now. An in-memory store lives inside its server: see its /metrics (kvrelay_store_*) instead.
"""

from __future__ import annotations

import json

from kvrelay.errors import KvRelayError
from kvrelay.store.redis_stats import scan
from kvrelay.store.redis_names import redact


def add_arguments(p):
    p.add_argument("--store", required=True, help="redis://host:port/db (the deployment's page store)")
    p.add_argument("--prefix", default="kvrelay", help="key prefix of the store (default kvrelay)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--delete-orphans", action="store_true", help="delete the orphaned values found")


def run(args) -> int:
    try:
        import redis
    except ImportError:
        raise KvRelayError("`kvrelay store stats` needs the redis client: pip install 'kvrelay[serve]'") from None
    if not args.store.startswith(("redis://", "rediss://")):
        raise KvRelayError(
            f"--store {args.store}: only a Redis store can be inspected from outside its server "
            "(an in-memory store: see the server's /metrics, kvrelay_store_*)"
        )
    try:
        r = redis.Redis.from_url(args.store.split("?", 1)[0], socket_timeout=5, socket_connect_timeout=5)
        s = scan(r, args.prefix)
        orphans = s.pop("_orphans")
        if args.delete_orphans and orphans:
            for i in range(0, len(orphans), 500):
                r.delete(*orphans[i : i + 500])
            s["orphans_deleted"] = len(orphans)
    except redis.exceptions.RedisError as e:
        raise KvRelayError(f"page store {redact(args.store)}: {e}") from None
    s["store"] = redact(args.store)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"{s['store']}: {s['pages']} pages, {s['tenants']} tenants")
    for kind in ("index", "marker", "value", "other"):
        if s["keys"].get(kind):
            print(
                f"  {kind:<7} {s['keys'][kind]:>8} keys {s['bytes'].get(kind, 0) / 2**20:>9.1f} MiB "
                f"{s['without_ttl'].get(kind, 0):>8} without TTL"
            )
    print(
        f"  orphaned values {s['orphan_values']} ({s['orphan_values_without_ttl']} without TTL), "
        f"dangling index entries {s['dangling_index_entries']}"
        + (f"; deleted {s['orphans_deleted']}" if "orphans_deleted" in s else "")
    )
    return 0
