"""Keep a kvrelay server up: notice a dead stub or tritonserver, restart the whole server.

Triton 2.51 neither restarts a Python-backend stub that died nor stops answering ready = 200 for its
model, so a dead stub would fail every request it should serve, forever. The supervisor checks the
server's processes every second; when tritonserver or any stub is gone it restarts tritonserver on
the same ports. While it restarts, the ports are closed: requests in flight fail at once with a
connection error (gRPC UNAVAILABLE), health checks fail, and a load balancer takes the server out
until it is ready again. Restarting everything (rather than one model) keeps the serving core, its
engines and the unary forwarder consistent; the in-memory page store starts empty (a cache).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque

from kvrelay.errors import KvRelayError
from kvrelay.server import procstats
from kvrelay.server.launch import start

log = logging.getLogger("kvrelay.server.supervisor")
MAX_RESTARTS = 5  # within RESTART_WINDOW_S; more is a crash loop: give up and say so
RESTART_WINDOW_S = 300.0


class Supervised:
    """A started TritonServer (kvrelay.server.launch.start) and what it must keep running."""

    def __init__(self, dep, workdir, say=None, **ports):
        self.dep, self.workdir, self.ports = dep, workdir, ports
        self.say = say or (lambda msg: print(f"kvrelay: {msg}", file=sys.stderr, flush=True))
        self.server = None
        self.expected: set[str] = set()
        self.restarts: deque[float] = deque()

    def start(self) -> "Supervised":
        self.server = start(self.dep, self.workdir, **self.ports)
        # fix the ports: a restart must come back where clients look for it
        self.ports = dict(
            http_port=self.server.http_port,
            grpc_port=self.server.grpc_port,
            metrics_port=self.server.metrics_port,
            host=self.server.host,
        )
        self.expected = {p.name for p in procstats.server_tree(self.server.proc.pid)}
        return self

    def problem(self) -> str | None:
        """Why the server cannot serve as deployed, or None."""
        proc = self.server.proc
        if proc.poll() is not None:
            return f"tritonserver exited ({proc.returncode})"
        alive = {p.name for p in procstats.server_tree(proc.pid)}
        missing = sorted(self.expected - alive)
        return f"stub {', '.join(missing)} died" if missing else None

    def check(self) -> bool:
        """One supervision round: restart if needed. False once it gave up (a crash loop)."""
        why = self.problem()
        if why is None:
            return True
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            self.say(
                f"{why}; {MAX_RESTARTS} restarts in {RESTART_WINDOW_S:.0f} s already: giving up "
                f"(log {self.server.log_path})"
            )
            return False
        self.restarts.append(now)
        self.say(f"{why}: restarting tritonserver (log {self.server.log_path})")
        t0 = time.monotonic()
        self.server.stop(timeout_s=2)  # part of it is dead: no point in a long graceful exit
        try:
            self.start()
        except KvRelayError as e:
            self.say(f"restart failed: {e}")
            return False
        self.say(f"ready again after {time.monotonic() - t0:.1f} s")
        return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
