#!/usr/bin/env python
"""Registering an adapter on a running server, under load (issue 25: servable within 2 s, no failed
request for the others).

Serves smol-lora (`kvrelay models build smol-lora`) with lora = "unmerged"; 4 client threads ask its
variants in a loop over HTTP; meanwhile a new random rank-16 all-linear adapter (kvrelay.bench.adapters)
is registered by the first request naming it with lora_path, and then asked again. Prints one JSON
object: the registering request's time to its first token and to its end against the same request
on an already-registered adapter, the background requests and their failures.

    .venv/bin/python scripts/lora_register_under_load.py [--http-port 8700]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

from kvrelay import paths
from kvrelay.bench.adapters import random_adapters
from kvrelay.families import family_spec
from kvrelay.server import client, launch
from kvrelay.serving import deployment as dp

CONTEXT = "kvrelay serves many fine-tuned variants of one model on shared hardware. " * 12


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http-port", type=int, default=8700)
    p.add_argument("--max-tokens", type=int, default=8)
    a = p.parse_args()
    base = family_spec("smol-lora").dirs["base"]
    new = random_adapters(base, 1, 16, key="smol-lora-late")[0]
    toml = paths.home() / "lora-register.toml"
    toml.write_text('family = "smol-lora"\nlora = "unmerged"\nmax_loras = 8\nvariant_entry_points = false\n')
    port = a.http_port
    server = launch.start(
        dp.load(toml),
        paths.home() / "serve" / "lora-register",
        http_port=port,
        grpc_port=port + 1,
        metrics_port=port + 2,
    )
    url = server.http_url
    try:
        stop, done, failed = threading.Event(), [], []

        def load(i: int):
            variants = ["code", "docs", "legal", "changelog"]
            n = 0
            while not stop.is_set():
                try:
                    client.infer(
                        url,
                        f"Question {n} of client {i}.",
                        a.max_tokens,
                        model=variants[(i + n) % 4],
                        context=CONTEXT,
                        tenant=f"t{i}",
                    )
                    done.append(1)
                except Exception as e:  # noqa: BLE001 - every failure counts
                    failed.append(str(e))
                n += 1

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(20)  # the load in its stride
        ask = lambda m, **kw: client.stream(
            server.grpc_url, "Summarise the text above.", a.max_tokens, model=m, context=CONTEXT, tenant="new", **kw
        )
        known = [ask("code") for _ in range(3)]
        first = ask("late", lora_path=str(new))
        again = [ask("late") for _ in range(3)]
        time.sleep(5)
        stop.set()
        for t in threads:
            t.join(120)
        med = lambda rs, k: round(statistics.median(getattr(r, k) for r in rs), 3)
        print(
            json.dumps(
                {
                    "registering_request": {
                        "ttft_s": round(first.ttft_s, 3),
                        "latency_s": round(first.latency_s, 3),
                        "output_tokens": first.info.get("output_tokens"),
                        "variant": first.info.get("variant"),
                    },
                    "late_again_median": {"ttft_s": med(again, "ttft_s"), "latency_s": med(again, "latency_s")},
                    "known_adapter_median": {"ttft_s": med(known, "ttft_s"), "latency_s": med(known, "latency_s")},
                    "background": {"requests": len(done), "failed": len(failed), "errors": failed[:3]},
                },
                indent=1,
            )
        )
        return 0 if not failed else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
