"""Load tests: the same seeded workload against a server with cross-model sharing off and on.

    workload.py      contexts (1k-4k tokens) and a deterministic request sequence (Zipf contexts,
                     uniform variants, short outputs, closed-loop or Poisson arrivals)
    users.py         Locust users (gRPC streaming with client-side TTFT; HTTP generate / SSE) and the
                     per-request record they attach to Locust's request event
    runner.py        Locust as a library: one headless run against one server, warm-up excluded;
                     both modes on fresh servers
    report.py        per-mode figures, the on/off ratio, the quality spot check, table and plot
    loadtest_cmd.py  `kvrelay loadtest`: the mixed scenario (mixed.py) or goodput (goodput.py)
    stress_cmd.py    `kvrelay stress`: concurrent mixed clients (stress.py)

Only users.py and runner.py import Locust (which monkey-patches the process with gevent on import);
workload.py and report.py stay importable anywhere.
"""
