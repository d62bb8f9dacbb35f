"""`kvrelay query` with no server says where it looked and what to do, in one line, exit 2."""

import subprocess
import sys

import pytest

from kvrelay.server.tritonserver import free_port


@pytest.mark.parametrize("extra,proto", [([], "HTTP"), (["--protocol", "grpc"], "GRPC"), (["--stream"], "GRPC")])
def test_no_server_is_one_clear_line(extra, proto):
    url = f"127.0.0.1:{free_port()}"
    r = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "query", "hello", "--url", url, *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"kvrelay: error: no kvrelay server answers at {url} ({proto}); "
        "start one with `kvrelay serve` or give its address with --url"
    )
