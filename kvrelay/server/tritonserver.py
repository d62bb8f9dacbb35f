"""Run the real tritonserver that ships in the nvidia-pytriton wheel (CPU machines) or the NGC image.

Recipe (../shared/DESIGN.md): a backend directory whose python/ holds the wheel's libtriton_python.so,
triton_python_backend_utils.py and the stub for this Python; the venv's bin/ first on PATH so stubs
import our packages; LD_LIBRARY_PATH = this interpreter's LIBDIR.
"""

from __future__ import annotations

import ctypes
import glob
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from kvrelay.errors import KvRelayError

SHM_POOL_BYTES = 64 << 20  # per Python-backend stub
# What tritonserver logs on every start on a machine without a GPU: never the reason it failed.
CPU_NOISE = ("CUDA", "NVML", "DCGM", "pinned", "CudaDriverHelper")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wheel_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise KvRelayError(
            "tritonserver not found: pip install nvidia-pytriton==0.7.0 (or run inside the NGC Triton image)"
        ) from None
    return Path(pytriton.__file__).parent / "tritonserver"


def binary() -> Path:
    system = Path("/opt/tritonserver/bin/tritonserver")  # NGC image
    return system if system.exists() else _wheel_dir() / "bin" / "tritonserver"


def backend_dir(dest: Path) -> Path:
    system = Path("/opt/tritonserver/backends")
    if system.exists() and not (_has_pytriton()):
        return system
    wheel = _wheel_dir()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    py = Path(dest) / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (
        wheel / "backends/python/libtriton_python.so",
        wheel / "backends/python/triton_python_backend_utils.py",
        wheel / f"python_backend_stubs/{ver}/triton_python_backend_stub",
    ):
        if not src.exists():
            raise KvRelayError(f"{src} missing: the pytriton wheel has no Python {ver} backend stub")
        link = py / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    return Path(dest)


def _has_pytriton() -> bool:
    try:
        import pytriton  # noqa: F401

        return True
    except ImportError:
        return False


class TritonServer:
    def __init__(
        self,
        repo: Path,
        workdir: Path,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        host: str = "127.0.0.1",
        log_verbose: int = 0,
        extra_env: dict | None = None,
    ):
        self.repo, self.workdir = Path(repo), Path(workdir)
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.host, self.log_verbose, self.extra_env = host, log_verbose, extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "tritonserver.log"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 180) -> "TritonServer":
        """Start and wait until ready. The ports are checked first (a taken port fails in one line,
        before any model loads); tritonserver dies with the thread that started it (PDEATHSIG), so a
        `kill -9` of its parent leaves nothing serving; an interrupt while loading stops it cleanly."""
        self.check_ports()
        remove_stale_regions()
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = ":".join(
            filter(None, [sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH")])
        )
        env["PYTHONUTF8"] = "1"  # the stubs' embedded Python gets no locale coercion: ASCII otherwise
        env.update(self.extra_env)
        cmd = [
            str(binary()),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_dir(self.workdir / 'backends')}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            # A large Python-backend shm pool from the start: growing the default 1 MiB pool under
            # concurrent BLS traffic crashes 2.51 (cf. triton-inference-server/server#8882).
            f"--backend-config=python,shm-default-byte-size={SHM_POOL_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_POOL_BYTES}",
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            self.wait_ready(timeout_s)
        except BaseException:  # not ready, or Ctrl-C while models load: leave nothing behind
            self.stop()
            raise
        return self

    def check_ports(self) -> None:
        for what, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port), ("metrics", self.metrics_port)):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((self.host, port))
                except OSError as e:
                    raise KvRelayError(
                        f"{what} port {self.host}:{port} is not free ({e.strerror}): stop what uses it "
                        f"or choose another port"
                    ) from None

    def wait_ready(self, timeout_s: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise KvRelayError(
                    f"tritonserver exited with code {self.proc.returncode} while loading: "
                    f"{self.failure_line()} (log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise KvRelayError(
            f"tritonserver not ready after {timeout_s:.0f}s: {self.failure_line()} (log: {self.log_path})"
        )

    def failure_line(self) -> str:
        """The log line that says why, not the 40 lines of tables around it."""
        lines = [
            l
            for l in self.log_tail(400).splitlines()
            if l.strip() and not l.startswith(("+", "|")) and not any(n in l for n in CPU_NOISE)
        ]
        for l in reversed(lines):
            if l.startswith("E") or "error" in l.lower() or "failed" in l.lower():
                return l.strip()[:500]
        return lines[-1].strip()[:500] if lines else "no log output"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM, wait; SIGKILL the process group if it lingers; then clear stray stubs and shm.
        tritonserver gives requests in flight --exit-timeout-secs (10) and then says it exits
        immediately, but under load its exit itself then hung for 50 s: 15 s is the whole budget."""
        if self.proc is None:
            return
        mine = self.shm_regions()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        _kill_group(self.proc.pid)
        for region in mine:  # left only if a stub died hard; nobody else can be using it now
            try:
                os.unlink(region)
            except FileNotFoundError:
                pass
        remove_stale_regions()  # a stub that died earlier is no longer among `mine`
        self._log.close()
        self.proc = None

    def shm_regions(self) -> list[str]:
        """This server's Python-backend shm regions (each stub is started with its region's name)."""
        return _stub_regions(self.proc.pid) if self.proc else []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it exits (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def remove_stale_regions() -> list[str]:
    """Python-backend shm regions that no live process maps any more: left by a server or stub that
    was killed (SIGKILL never runs their cleanup). A region in use is always mapped by its stub."""
    regions = shm_regions()
    if not regions:
        return []
    mapped: set[str] = set()
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/maps", "rb") as f:
                for line in f:
                    if b"triton_python_backend_shm_region_" in line:
                        mapped.add(line.rsplit(b"/", 1)[-1].strip().decode())
        except OSError:
            continue
    stale = [r for r in regions if r.rsplit("/", 1)[-1] not in mapped]
    for r in stale:
        try:
            os.unlink(r)
        except FileNotFoundError:
            pass
    return stale


def _kill_group(pgid: int) -> None:
    """Python-backend stubs live in the server's process group (start_new_session): none may outlive it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.time() + 5
    while time.time() < deadline and stub_pids(pgid):
        time.sleep(0.05)


def _stub_regions(pgid: int) -> list[str]:
    out = []
    for pid in stub_pids(pgid):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        out += [f"/dev/shm/{a.decode()}" for a in args if a.startswith(b"triton_python_backend_shm_region_")]
    return sorted(set(out))


def stub_pids(pgid: int | None = None) -> list[int]:
    out = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            cmd = open(f"{d}/cmdline", "rb").read()
            if b"triton_python_backend_stub" not in cmd:
                continue
            stat = open(f"{d}/stat").read().rsplit(")", 1)[1].split()
            if stat[0] == "Z":
                continue
            if pgid is None or int(stat[2]) == pgid:
                out.append(int(d.split("/")[-1]))
        except OSError:
            continue
    return out


def shm_regions() -> list[str]:
    return glob.glob("/dev/shm/triton_python_backend_shm_region_*")
