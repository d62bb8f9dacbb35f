"""The selector's SLO rule runs in serving: with a deployment SLO the core fits a latency model to its
own prefills, an idle request recomputes the most layers that meet the SLO, a queued one the fewest."""

import pytest

from helpers.profiles import write_profile
from kvrelay.model.plan import RecomputePlan
from kvrelay.serving.selector import OnlineLatency
from kvrelay.serving.orchestrator import Orchestrator, ServeRequest
from kvrelay.store import MemoryStore

from .conftest import deployment
from .test_core_in_process import Collect

CHEAP, THOROUGH = RecomputePlan(((2, 4),)), RecomputePlan(((0, 8),))


def ctx(i):
    return [3000 + 53 * i + t for t in range(16 * 16)]


@pytest.fixture()
def core(tmp_path, tiny_family, request):
    write_profile(tmp_path, "tiny", "code", "base", tiny_family.fingerprint, 8, THOROUGH, more=[(CHEAP, 99.5)])
    o = Orchestrator(deployment(tmp_path, slo_s=request.param), store=MemoryStore(64 << 20))
    yield o
    o.close()


def ask(core, model, tokens):
    sink = Collect()
    core.serve(ServeRequest(tokens=tokens, max_tokens=1, model=model, tenant="t"), sink)
    core.router.flush()
    return sink.replies[-1]


@pytest.mark.parametrize("core", [60.0], indirect=True)
def test_an_idle_request_with_a_loose_slo_recomputes_more_than_a_queued_one(core):
    for i in range(3):
        ask(core, "code", ctx(i))  # full prefills: the latency model's first samples
    assert core.latency.predict(256, 8) is not None
    idle = ask(core, "base", ctx(0))
    assert idle.route.startswith("reuse: idle: most recompute meeting the 60.000s SLO") and idle.recomputed_layers == 8
    ids = core.ids
    queued = core.selector.choose(
        "code", "base", ids["code"].fingerprint, ids["base"].fingerprint, context_tokens=256, queued=2, slo_s=60.0
    )
    assert queued.plan == CHEAP and queued.reason.startswith("queueing")


@pytest.mark.parametrize("core", [1e-6], indirect=True)
def test_an_slo_no_plan_meets_takes_the_fewest_layers(core):
    for i in range(3):
        ask(core, "code", ctx(10 + i))
    r = ask(core, "base", ctx(10))
    assert r.route.startswith("reuse: idle: no plan meets") and r.recomputed_layers == 2


def test_the_online_model_fits_cost_per_layer_and_waits_for_samples():
    m = OnlineLatency(min_samples=2)
    m.observe(1000, 30, 3.0)
    assert m.predict(1000, 30) is None
    m.observe(2000, 30, 6.0)
    assert m.predict(1000, 3) == pytest.approx(0.3)  # full prefills only: cost in proportion to layers
    m.observe(1000, 3, 0.5)  # a fixed share per token shows up with re-prefills
    assert 0.3 < m.predict(1000, 3) < 0.6 and m.predict(1000, 30) == pytest.approx(3.0, rel=0.1)
