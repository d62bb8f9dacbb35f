"""What a Redis page store holds, read from outside its server: keys by kind, bytes, tenants, pages,
orphans (for `kvrelay store stats`, kvrelay/store/stats_cmd.py, and the tests that check cleanup).

Key kinds (kvrelay.store.redis_store): index sets ({p}:{tenant}:{fp}:i:{B}:{hash}), page markers
({p}:{tenant}:{fp}:p:{producer}:{B}:{hash}) and values ({marker}:{write id}:k{l} / :e{l}).
An orphan is a value whose marker is gone or names another write id; a dangling index entry names a
producer whose marker is gone. Both are harmless to requests (a lookup trusts only markers, a fetch
checks every value), but they hold memory: orphans normally expire on their own (values wait for
their marker under a short TTL).
"""

from __future__ import annotations

import json
from collections import Counter

from kvrelay.store.redis_names import esc as _esc


def scan(r, prefix: str) -> dict:
    """Classify every key under `prefix`. Reads keys, TTLs and value sizes; writes nothing."""
    kinds, no_ttl, nbytes = Counter(), Counter(), Counter()
    markers: dict[str, str] = {}
    values: list[tuple[str, str, str, int]] = []  # (key, marker, write id, ttl)
    index: list[str] = []
    tenants = set()
    keys = [k.decode() for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
    for chunk in range(0, len(keys), 500):
        part = keys[chunk : chunk + 500]
        pipe = r.pipeline(transaction=False)
        for k in part:
            pipe.ttl(k)
            pipe.memory_usage(k)
        res = pipe.execute()
        for i, k in enumerate(part):
            ttl, size = res[2 * i], res[2 * i + 1] or 0
            rest = k[len(prefix) + 1 :].split(":")
            kind = (
                "index"
                if len(rest) == 5 and rest[2] == "i"
                else "marker"
                if len(rest) == 6 and rest[2] == "p"
                else "value"
                if len(rest) == 8 and rest[2] == "p"
                else "other"
            )
            kinds[kind] += 1
            nbytes[kind] += size
            if ttl == -1:
                no_ttl[kind] += 1
            if kind != "other":
                tenants.add(rest[0])
            if kind == "marker":
                markers[k] = ""
            elif kind == "value":
                values.append((k, k.rsplit(":", 2)[0], rest[6], ttl))
            elif kind == "index":
                index.append(k)
    pipe = r.pipeline(transaction=False)
    names = list(markers)
    for m in names:
        pipe.get(m)
    for m, raw in zip(names, pipe.execute()):
        try:
            markers[m] = json.loads(raw)["g"] if raw else ""
        except (ValueError, KeyError, TypeError):
            markers[m] = ""
    orphans = [(k, ttl) for k, m, g, ttl in values if markers.get(m) != g]
    pipe = r.pipeline(transaction=False)
    for idx in index:
        pipe.smembers(idx)
    dangling = 0
    for idx, producers in zip(index, pipe.execute() if index else []):
        base, _, rest = idx.partition(":i:")
        B, _, h = rest.partition(":")
        dangling += sum(1 for p in producers if f"{base}:p:{_esc(p.decode())}:{B}:{h}" not in markers)
    return {
        "keys": dict(kinds),
        "bytes": dict(nbytes),
        "without_ttl": dict(no_ttl),
        "tenants": len(tenants),
        "pages": len(markers),
        "orphan_values": len(orphans),
        "orphan_values_without_ttl": sum(1 for _, ttl in orphans if ttl == -1),
        "dangling_index_entries": dangling,
        "_orphans": [k for k, _ in orphans],
    }
