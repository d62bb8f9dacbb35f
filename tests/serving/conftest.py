"""Real tritonserver fixtures (tiny family: base + code), with profiles written by the tests so the
plan the orchestrator picks is known: base->code recomputes every layer (so its text must equal
code's own full prefill), code->base recomputes layers 2-4 and reuses the rest."""

from __future__ import annotations

import pytest

from kvrelay.serving.orchestrator import ClientGone
from kvrelay.serving import deployment as dp
from kvrelay.model.plan import RecomputePlan
from kvrelay.server.launch import start
from kvrelay.server.tritonserver import shm_regions, stub_pids

from helpers.profiles import write_profile

PLANS = {("base", "code"): RecomputePlan.all(8), ("code", "base"): RecomputePlan(((2, 4),))}


@pytest.fixture(scope="session")
def test_profiles(tmp_path_factory, tiny_family):
    root = tmp_path_factory.mktemp("profiles")
    for (s, r), plan in PLANS.items():
        write_profile(root, "tiny", s, r, tiny_family.fingerprint, 8, plan)
    return root


def deployment(profiles, store="memory:256MiB", **kw) -> dp.Deployment:
    models = [dp.ModelDeployment("base", kv_cache_bytes=64 << 20), dp.ModelDeployment("code", kv_cache_bytes=64 << 20)]
    return dp.Deployment(
        family="tiny", models=models, store=store, profiles_dir=str(profiles), max_tokens_limit=256, **kw
    )


class Running:
    """A started server; on close it must leave no stub process and no shared-memory region behind."""

    def __init__(self, dep, workdir):
        self.server = start(dep, workdir)
        self.pgid = self.server.proc.pid
        self.regions = self.server.shm_regions()
        assert self.regions, "expected the stubs' shared-memory regions"

    def close(self):
        self.server.stop()
        assert stub_pids(self.pgid) == [], "python backend stubs outlived tritonserver"
        left = [r for r in self.regions if r in shm_regions()]
        assert not left, f"tritonserver left /dev/shm regions behind: {left}"


@pytest.fixture(scope="session")
def server(tmp_path_factory, test_profiles):
    r = Running(deployment(test_profiles), tmp_path_factory.mktemp("server"))
    yield r.server
    r.close()


class Collect:
    """A Sink for Orchestrator.serve that keeps every reply; `leave_after` replies, then the client
    hangs up (ClientGone)."""

    def __init__(self, leave_after: int | None = None):
        self.replies, self.leave_after = [], leave_after

    def send(self, reply):
        if self.leave_after is not None and len(self.replies) >= self.leave_after:
            raise ClientGone()
        self.replies.append(reply)

    def cancelled(self):
        return False
