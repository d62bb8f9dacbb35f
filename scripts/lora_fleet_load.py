#!/usr/bin/env python
"""A fleet of LoRA adapters under load: one engine with the adapters unmerged against one merged
engine per adapter, the same workload side by side in one run (issue 25, item 5).

The family: the SmolLM2 base (smol-lora's, or --base) and --adapters random rank-16 PEFT adapters on
all seven projections (kvrelay.bench.adapters, those of scripts/lora_rss.py). Requests pick an
adapter by Zipf popularity (--variant-zipf, default 1.0) over shared contexts. For each of
lora = "merged" and lora = "unmerged" a fresh server is started, `kvrelay loadtest --url` runs the
same seeded workload against it with sharing on, and the server tree's RSS is read from /proc after
the run. Prints one JSON object: per layout throughput, p50/p99 TTFT, errors, RSS, start time, and
the ratios unmerged / merged.

    .venv/bin/python scripts/lora_fleet_load.py [--adapters 8] [--base DIR] [-- LOADTEST ARGS]

Merged, every adapter is a full copy of the base's weights (513 MiB each in fp32) in the serving
core's process: 32 of them need about 17 GiB before any KV, more than a 24 GiB CI machine can hold
beside the rest, so the side-by-side default is 8.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from kvrelay import paths
from kvrelay.bench.adapters import random_adapters
from kvrelay.families import family_spec, user
from kvrelay.server import launch, procstats
from kvrelay.serving import deployment as dp


def run_layout(lora: str, name: str, n: int, port: int, out: Path, extra: list[str]) -> dict:
    toml = paths.home() / f"{name}-{lora}.toml"
    toml.write_text(
        f'family = "{name}"\nlora = "{lora}"\nmax_loras = {min(n, 8)}\nvariant_entry_points = false\n'
        'store = "memory:4GiB"\n'
    )
    t0 = time.time()
    server = launch.start(
        dp.load(toml), out / "servers" / lora, http_port=port, grpc_port=port + 1, metrics_port=port + 2
    )
    try:
        started = time.time() - t0
        cmd = [sys.executable, "-m", "kvrelay.cli", "loadtest", "--deployment", str(toml), "--url", server.grpc_url]
        cmd += ["--mode", "on", "--json", "--no-progress", "--out", str(out / lora), *extra]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"lora_fleet_load: the {lora} load test failed (exit {p.returncode})")
        on = json.loads(p.stdout)["modes"]["on"]
        rss = sum(pr.rss_mib for pr in procstats.server_tree(server.proc.pid))
    finally:
        server.stop()
    return {
        "start_s": round(started, 1),
        "rss_mib": round(rss, 1),
        "requests_per_s": on["requests_per_s"],
        "output_tokens_per_s": on["output_tokens_per_s"],
        "ttft_ms": {k: on["ttft_ms"][k] for k in ("p50", "p99")},
        "errors": on["errors"],
        "ok": on["ok"],
    }


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, help="the base model directory (default: smol-lora's, built)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--variant-zipf", type=float, default=1.0)
    p.add_argument("--http-port", type=int, default=8700)
    p.add_argument("--out", type=Path, default=paths.home() / "lora-fleet-load")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if a.adapters < 1:
        p.error("--adapters must be >= 1")
    base = a.base or family_spec("smol-lora").dirs["base"]
    adapters = random_adapters(base, a.adapters, 16, key="smol-lora", scale=0.015)
    name = f"lora-fleet-{a.adapters}"
    user.ensure_registered(name, str(base), {f"f{i:02d}": str(d) for i, d in enumerate(adapters)})
    extra = ["--variant-zipf", str(a.variant_zipf), *extra]
    layouts = {
        lora: run_layout(lora, name, a.adapters, a.http_port + 10 * i, a.out, extra)
        for i, lora in enumerate(("merged", "unmerged"))
    }
    m, u = layouts["merged"], layouts["unmerged"]
    result = {
        "adapters": a.adapters,
        "variant_zipf": a.variant_zipf,
        "layouts": layouts,
        "throughput_unmerged_over_merged": round(u["requests_per_s"] / m["requests_per_s"], 3),
        "rss_unmerged_over_merged": round(u["rss_mib"] / m["rss_mib"], 3),
    }
    print(json.dumps(result, indent=1))
    return 0 if not (m["errors"] or u["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
