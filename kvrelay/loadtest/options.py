"""Argument checks the load-test commands share (`kvrelay loadtest`, `kvrelay stress`)."""

from __future__ import annotations

import argparse
import signal

from kvrelay.errors import KvRelayError
from kvrelay.units import parse_range

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def int_range(text: str) -> tuple[int, int]:
    try:
        return parse_range(text, minimum=1)
    except KvRelayError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_url(url: str) -> str:
    url = url.split("://", 1)[-1].rstrip("/")
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit():
        raise KvRelayError(f"--url must be HOST:PORT, got {url!r}")
    if host not in LOOPBACK:
        raise KvRelayError(f"--url {url}: load tests only target this machine (127.0.0.1, localhost, ::1)")
    return url


def interrupts_stop_cleanly() -> None:
    """Ctrl-C and SIGTERM end a run cleanly (servers stopped, even when the shell started us with
    SIGINT ignored). Under gevent the handler runs in the hub, so the interrupt is thrown into the
    main greenlet, where the run's cleanup waits, never into a user's greenlet."""
    import gevent

    main = gevent.getcurrent()
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, lambda: gevent.get_hub().loop.run_callback(main.throw, KeyboardInterrupt))
