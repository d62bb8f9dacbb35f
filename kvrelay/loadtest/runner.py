"""Locust as a library: one headless run against one server; both modes on fresh servers.

    run_mode(label, state, protocol, users, out_dir)  -> ModeRun  (Locust CSV + HTML written)
    run_both(dep, workload, opts, out_dir)              -> {"off": ModeRun, "on": ModeRun}

Each mode gets its own tritonserver (sharing off: Deployment.sharing=False; sharing on: True), a
fresh in-process page store and an empty engine cache, and the same request sequence. A warm-up
(separate contexts and tenant, sent directly, not through Locust) runs first and is excluded from
every figure. Servers are stopped at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gevent
from locust.env import Environment
from locust.html import get_html_report
from locust.stats import PERCENTILES_TO_REPORT, StatsCSVFileWriter, stats_history

from kvrelay.errors import KvRelayError
from kvrelay.loadtest import report
from kvrelay.loadtest import users as lu
from kvrelay.loadtest.workload import Schedule, Workload
from kvrelay.server.launch import start


@dataclass
class RunOptions:
    protocol: str = "grpc-stream"
    users: int = 4
    duration_s: float = 300.0
    timeout_s: float = 120.0
    progress: bool = True
    grace_s: float = 60.0


@dataclass
class ModeRun:
    label: str
    records: list[dict]
    warmup: list[dict]
    window_s: float
    files: dict
    server_log: str = ""


class Progress:
    """A status line on stderr (rewritten in place on a terminal, every 10 s otherwise)."""

    def __init__(self, label: str, state: lu.LoadState, enabled: bool = True, stream=sys.stderr):
        self.label, self.state, self.enabled, self.stream = label, state, enabled, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._g = None

    def line(self) -> str:
        st, s = self.state, self.state.schedule
        errors = sum(1 for r in st.records if not r["ok"])
        el = s.elapsed()
        rate = s.completed / el if el > 0 else 0.0
        return (
            f"[{self.label}] {s.completed}/{len(s.requests)} done, {s.in_flight} in flight, {errors} errors, "
            f"{rate:.2f} req/s, {el:.0f}s"
        )

    def _loop(self):
        period = 1.0 if self.tty else 10.0
        while True:
            gevent.sleep(period)
            self.emit()

    def emit(self, final: bool = False):
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def start(self):
        if self.enabled:
            self._g = gevent.spawn(self._loop)
        return self

    def stop(self):
        if self._g is not None:
            self._g.kill()
        self.emit(final=True)


def warm_up(state: lu.LoadState, protocol: str, log) -> list[dict]:
    """The workload's warm-up requests, one at a time (first model prefills, the rest reuse)."""
    out = []
    for r in state.workload.warmup_requests:
        rec = lu.send_direct(state, r, protocol)
        out.append(rec)
        if not rec["ok"]:
            raise KvRelayError(f"warm-up request to {r.model} failed: {rec['error']}")
    if out:
        log(f"warm-up: {len(out)} requests, routes " + ", ".join(sorted({f"{x['model']}:{x['route']}" for x in out})))
    return out


def run_mode(label: str, state: lu.LoadState, opts: RunOptions, out_dir: Path, log=None) -> ModeRun:
    """Warm up, then run the measured sequence through Locust; write <label>_*.csv and <label>.html."""
    log = log or report.log
    out_dir.mkdir(parents=True, exist_ok=True)
    warm = warm_up(state, opts.protocol, log)
    user_cls = lu.USER_CLASSES[opts.protocol]
    env = Environment(user_classes=[user_cls], host=f"http://{state.http_url}", stop_timeout=opts.timeout_s)
    env.kvrelay = state
    runner = env.create_local_runner()
    base = str(out_dir / f"locust_{label.replace(' ', '_')}")
    writer = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, base, full_history=True)
    greenlets = [gevent.spawn(writer), gevent.spawn(stats_history, runner)]
    progress = Progress(label, state, opts.progress).start()
    try:
        state.schedule.start()
        runner.start(opts.users, spawn_rate=max(opts.users, 100))
        deadline = opts.duration_s + opts.grace_s
        while not state.schedule.done:
            gevent.sleep(0.2)
            if state.schedule.elapsed() > deadline:
                state.schedule.close()
                break
            if runner.exceptions:  # the users catch request failures: anything else is a bug, stop now
                state.schedule.close()
                exc = next(iter(runner.exceptions.values()))
                raise KvRelayError(f"{label}: a Locust user failed: {exc['msg']}\n{exc['traceback']}")
        state.abandon_in_flight("cut off at the run's time limit")
    finally:
        runner.quit()
        progress.stop()
        for g in greenlets:
            g.kill()
        _final_csv(writer)
    html = Path(base + ".html")
    html.write_text(get_html_report(env, show_download_link=False), encoding="utf-8")
    files = {
        "stats_csv": base + "_stats.csv",
        "history_csv": base + "_stats_history.csv",
        "failures_csv": base + "_failures.csv",
        "html": str(html),
    }
    return ModeRun(label, list(state.records), warm, state.schedule.window_s, files)


def _final_csv(w: StatsCSVFileWriter) -> None:
    """The periodic writer may be up to a second stale: write the final rows, then close."""
    for fh, fn in (
        (w.requests_csv_filehandle, w.requests_csv),
        (w.failures_csv_filehandle, w.failures_csv),
        (w.exceptions_csv_filehandle, w.exceptions_csv),
    ):
        fh.seek(0)
        fh.truncate()
        fn(csv.writer(fh))
    w.close_files()


def make_state(workload: Workload, opts: RunOptions, http_url: str, grpc_url: str) -> lu.LoadState:
    return lu.LoadState(
        workload,
        Schedule(workload.requests, opts.duration_s),
        grpc_url=grpc_url,
        http_url=http_url,
        timeout_s=opts.timeout_s,
    )


def run_both(dep, workload: Workload, opts: RunOptions, out_dir: Path, modes=("off", "on"), log=None) -> dict:
    """For each mode: a fresh server (own workdir, repository, in-memory store), the same workload."""
    log = log or report.log
    out: dict[str, ModeRun] = {}
    for mode in modes:
        d = dataclasses.replace(dep, sharing=(mode == "on"))
        label = f"sharing {mode}"
        workdir = out_dir / "servers" / mode
        log(f"{label}: starting tritonserver ({d.family}: {', '.join(d.model_names)}; store {d.store})")
        t0 = time.monotonic()
        server = start(d, workdir)
        try:
            log(f"{label}: ready in {time.monotonic() - t0:.0f}s (HTTP {server.http_url}, gRPC {server.grpc_url})")
            run = run_mode(label, make_state(workload, opts, server.http_url, server.grpc_url), opts, out_dir, log)
            run.server_log = str(server.log_path)
            out[mode] = run
        finally:
            server.stop()
    return out
