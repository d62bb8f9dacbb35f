"""`kvrelay stress` refuses bad arguments before it starts anything; its report groups errors."""

import subprocess
import sys

import pytest

from kvrelay.loadtest import stress


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--clients", "0"], "--clients must be >= 1"),
        (["--duration", "0"], "--duration must be > 0"),
        (["--disconnect", "1.5"], "--disconnect must be in 0..1"),
        (["--kinds", "http,carrier-pigeon"], "unknown client kind(s) ['carrier-pigeon']"),
        (["--url", "10.1.2.3:8000"], "load tests only target this machine"),
        (["--url", "127.0.0.1:1"], "no kvrelay server answers at http://127.0.0.1:1"),
        (["--grpc-url", "127.0.0.1:8001"], "--grpc-url only goes with --url"),
    ],
)
def test_bad_arguments_exit_2_with_the_problem_named(args, msg):
    r = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "stress", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert "starting a server" not in r.stderr


def test_errors_are_grouped_by_message_without_ids_and_numbers():
    spec = stress.StressSpec("h:1", "h:2", ("base",), ("ctx",), clients=1, duration_s=1)
    res = stress.StressResult(
        spec,
        [
            stress.Outcome("http", "base", True, 0.5),
            stress.Outcome(
                "grpc",
                "base",
                False,
                1.0,
                error="grpc: " + stress._norm("Stub process 'orchestrator_stream_0_0' is not healthy."),
            ),
            stress.Outcome(
                "grpc",
                "base",
                False,
                1.0,
                error="grpc: " + stress._norm("Stub process 'orchestrator_stream_1_0' is not healthy."),
            ),
        ],
        wall_s=2.0,
    )
    s = stress.summary(res)
    assert s["requests"] == 3 and s["errors"] == 2
    assert s["errors_by_message"] == {"grpc: Stub process 'orchestrator_stream_N_N' is not healthy.": 2}
    assert s["by_kind"]["http"]["latency_s"]["p50"] == 0.5
