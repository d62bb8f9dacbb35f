"""Resident memory and thread counts of a tritonserver and its Python-backend stubs, from /proc.

A stub's command line names its model (`.../<model>/1/model.py`), so a stress run can say which
stub grew or died, not only that one did.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from kvrelay.server.tritonserver import stub_pids

PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    name: str  # "tritonserver" or the stub's model name
    rss_mib: float
    threads: int


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, threads) or None when the process is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[17])


def _rss_mib(pid: int) -> float:
    try:
        return int(open(f"/proc/{pid}/statm").read().split()[1]) * PAGE / 2**20
    except OSError:
        return 0.0


def stub_model(cmdline: list[bytes]) -> str:
    for a in cmdline:
        if a.endswith(b"/model.py"):
            return a.decode().rsplit("/", 3)[-3]
    return "?"


def server_tree(server_pid: int) -> list[Proc]:
    """The server and every live stub of its process group (stubs run in the server's session)."""
    out = []
    st = _stat(server_pid)
    if st and st[0] != "Z":
        out.append(Proc(server_pid, "tritonserver", _rss_mib(server_pid), st[1]))
    for pid in stub_pids(server_pid):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        st = _stat(pid)
        if st and st[0] != "Z":
            out.append(Proc(pid, stub_model(cmd), _rss_mib(pid), st[1]))
    return sorted(out, key=lambda p: (p.name != "tritonserver", p.name))


def server_pid_for_port(http_port: int) -> int | None:
    """The tritonserver process serving HTTP on this port (read from its command line)."""
    for d in glob.glob("/proc/[0-9]*"):
        try:
            cmd = open(f"{d}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"tritonserver") and f"--http-port={http_port}".encode() in cmd:
            return int(d.rsplit("/", 1)[1])
    return None
