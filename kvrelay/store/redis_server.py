"""A throwaway real `redis-server` on a free loopback port: for tests and `kvrelay bench prefill --store redis`.

Standard library only (it speaks just enough RESP to PING), so test helpers can use it anywhere.
No persistence (`--save "" --appendonly no`), its own temporary directory, removed on stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`RedisServer()` starts one and returns once it answers PING; `.url`, `.stop()` (SIGTERM),
    `.kill()` (SIGKILL: a crash), `.pause()` / `.resume()` (SIGSTOP / SIGCONT: a hung server, whose
    socket still accepts connections), `.restart()` (same port, empty). Also a context manager."""

    def __init__(
        self,
        binary: str | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout_s: float = 10.0,
    ):
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(self.binary):
            raise FileNotFoundError(f"redis-server not found ({self.binary}); install the redis-server package")
        self.host = "127.0.0.1"
        self.extra_args, self.startup_timeout_s = tuple(extra_args), startup_timeout_s
        self.dir = tempfile.mkdtemp(prefix="kvrelay-redis-")
        self.proc: subprocess.Popen | None = None
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port = port or free_port(self.host)
            try:
                self._start()
                return
            except RuntimeError:
                if port is not None or attempt == 2:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    raise

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--logfile",
            os.path.join(self.dir, "redis.log"),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if ping(self.host, self.port):
                return
            time.sleep(0.02)
        self._terminate(signal.SIGKILL)
        log = os.path.join(self.dir, "redis.log")
        tail = open(log).read()[-2000:] if os.path.exists(log) else ""
        raise RuntimeError(f"redis-server on port {self.port} did not come up:\n{tail}")

    def _terminate(self, sig, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if sig != signal.SIGKILL:
                try:
                    os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
                except ProcessLookupError:
                    pass
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Shut down cleanly and remove the data directory."""
        self._terminate(signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, as in a crash (restart() brings up an empty one)."""
        self._terminate(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (a hung server)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self._terminate(signal.SIGKILL)
        self._start()

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # last resort: never leave a server behind
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        except Exception:  # noqa: BLE001
            pass
