"""The unary entry point's way into the serving core: a local authenticated socket, not Triton BLS.

Triton answers HTTP /infer, /generate and gRPC unary only from a non-decoupled model, and the core
(engines, store, router) lives in the decoupled streaming model's process. The unary model forwards
each request here: a ServeRequest in, the final Reply (or an error with its kind) out. Only token
ids and small fields cross; KV pages never leave the core. Linux abstract socket + an HMAC handshake
(multiprocessing.connection's authkey) read from a 0600 key file, so only this deployment's models
can connect.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import asdict
from multiprocessing.connection import Client, Listener
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.serving.orchestrator import ClientGone, Reply, ServeRequest
from kvrelay.serving.engine_runner import EngineFailure

log = logging.getLogger("kvrelay.unary_channel")


class CoreUnavailable(EngineFailure):
    """The serving core cannot be reached (restarting, or gone): a server-side failure."""


def make_endpoint(dir_: Path) -> tuple[str, Path]:
    """(abstract socket address, key file) for a new deployment directory."""
    key = Path(dir_) / "core.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return f"@kvrelay-core-{secrets.token_hex(8)}", key


def _socket(address: str) -> str:
    """'@name' is Linux's abstract namespace (no file to leave behind), written with @ in configs."""
    return "\0" + address[1:] if address.startswith("@") else address


class _Collect:
    def __init__(self):
        self.reply: Reply | None = None

    def send(self, reply: Reply) -> None:
        if reply.finished:
            self.reply = reply

    def cancelled(self) -> bool:
        return False


class UnaryServer:
    """In the core's process: accepts the unary model's connections, one thread per connection."""

    def __init__(self, orchestrator, address: str, key_file: Path):
        self.orchestrator = orchestrator
        self.listener = Listener(_socket(address), family="AF_UNIX", authkey=Path(key_file).read_bytes())
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="unary-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn = self.listener.accept()
            except Exception as e:  # a failed handshake is a refused client, not the end of serving
                if self._closing:
                    return
                log.warning("unary channel: refused a connection: %s", e)
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), name="unary-conn", daemon=True).start()

    def _serve_conn(self, conn) -> None:
        with conn:
            while True:
                try:
                    req = conn.recv()
                except (EOFError, OSError):
                    return
                conn.send(self._one(req))

    def _one(self, req: ServeRequest) -> dict:
        sink = _Collect()
        try:
            self.orchestrator.serve(req, sink)
        except EngineFailure as e:
            return {"error": str(e), "internal": True}
        except KvRelayError as e:
            return {"error": str(e), "internal": False}
        except ClientGone:
            return {"error": "cancelled", "internal": False}
        except Exception as e:
            log.exception("serving core failure")
            return {"error": f"internal error: {e}", "internal": True}
        if sink.reply is None:
            return {"error": "internal error: the engine finished without a final reply", "internal": True}
        return {"reply": asdict(sink.reply)}

    def close(self) -> None:
        self._closing = True
        try:
            self.listener.close()
        except OSError:
            pass


class UnaryClient:
    """In the unary model's process: a pool of connections, one per concurrent request."""

    def __init__(self, address: str, key_file: Path):
        self.address, self.key = address, Path(key_file).read_bytes()
        self._idle: list = []
        self._lock = threading.Lock()

    def call(self, req: ServeRequest) -> Reply:
        conn = self._take()
        try:
            conn.send(req)
            answer = conn.recv()
        except (EOFError, OSError) as e:
            conn.close()
            raise CoreUnavailable(f"the serving core went away mid-request ({type(e).__name__}); retry") from None
        self._give(conn)
        if "reply" in answer:
            return Reply(**answer["reply"])
        if answer["internal"]:
            raise EngineFailure(answer["error"])
        raise KvRelayError(answer["error"])

    def _take(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            return Client(_socket(self.address), family="AF_UNIX", authkey=self.key)
        except (OSError, EOFError) as e:
            raise CoreUnavailable(f"the serving core is not reachable ({e}); retry") from None

    def _give(self, conn) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            for c in self._idle:
                c.close()
            self._idle.clear()
