"""A K/V-corrected plan served through the serving core: E travels at every layer, and the answer is
the engine's own re-prefill under that plan; without E at every layer the selector does not offer it."""

import pytest

from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams
from kvrelay.model.plan import RecomputePlan
from kvrelay.model import profile_file as pf
from kvrelay.serving.orchestrator import Orchestrator, ServeRequest
from kvrelay.store import MemoryStore

from .conftest import deployment
from .test_core_in_process import Collect

CTX = list(range(500, 500 + 16 * 10))
PLAN = RecomputePlan(((2, 4),), True)


def _tf_profile(root, fp, L, plan):
    c = {
        "plan": plan.to_list(),
        "kv_correction": plan.correct_kv,
        "layers_recomputed": plan.num_recomputed,
        "quality": 99.0,
        "retained_gain": 0.99,
        "retained_gain_ci": [0.99, 0.995],
        "top1_agreement": 0.99,
        "top1_agreement_ci": [0.985, 0.995],
        "kl": 0.001,
        "meets_target": True,
        "meets_strict": False,
        "prefill_s_fit": 0.1,
    }
    pf.save(
        {
            "format": pf.FORMAT,
            "family": "tiny",
            "sender": "code",
            "receiver": "base",
            "sender_fingerprint": fp,
            "receiver_fingerprint": fp,
            "num_layers": L,
            "stride": 2,
            "max_group_layers": 4,
            "dataset": {"kind": "test", "split": "profile", "samples": 2, "context_tokens": [0, 0]},
            "metric": {"name": "teacher_forced", "description": "test"},
            "configs": [c],
            "frontier": pf.pareto_frontier([c]),
            "baselines": {
                "full_prefill": {"layers_recomputed": L, "quality": 100.0},
                "full_reuse": {"layers_recomputed": 0, "quality": 50.0},
            },
            "command": "tests",
            "kvrelay_version": "test",
            "created": pf.now_utc(),
        },
        pf.path_for(root, "tiny", "code", "base"),
    )


@pytest.fixture(scope="module")
def profiles(tmp_path_factory, tiny_family):
    root = tmp_path_factory.mktemp("kvprof")
    _tf_profile(root, tiny_family.fingerprint, 8, PLAN)
    return root


def _ask(core, model, tokens):
    sink = Collect()
    core.serve(ServeRequest(tokens=tokens, max_tokens=4, model=model, tenant="t"), sink)
    return sink.replies[-1]


def _base_after_code(dep):
    """code prefills the context and publishes it; then base asks over the same context."""
    core = Orchestrator(dep, store=MemoryStore(256 << 20))
    try:
        _ask(core, "code", CTX + [1, 2])
        core.router.flush()
        return _ask(core, "base", CTX + [3])
    finally:
        core.close()


def test_corrected_plan_is_served_with_e_at_every_layer(profiles, tiny_family):
    from kvrelay.backends.torch_engine.engine import TorchEngine

    got = _base_after_code(deployment(profiles, e_layers="all"))
    assert got.route.startswith("reuse") and (got.donor, got.recomputed_layers) == ("code", 2)
    cfg = lambda: EngineConfig(kv_cache_bytes=64 << 20, e_layers=tuple(range(1, 8)), prefix_caching=False)
    S = TorchEngine.from_dir("code", tiny_family.model_dir("code"), cfg())
    R = TorchEngine.from_dir("base", tiny_family.model_dir("base"), cfg())
    pages = S.generate([Request("s", CTX + [1, 2], SamplingParams(max_tokens=1), export_pages=True)])["s"].pages
    want = R.generate([Request("r", CTX + [3], SamplingParams(max_tokens=4), donor=pages, plan=PLAN)])["r"]
    assert want.prefill.plan == str(PLAN)
    assert got.output_ids == want.output_tokens


def test_without_e_at_every_layer_the_corrected_plan_is_not_offered(profiles):
    got = _base_after_code(deployment(profiles))  # e_layers "even"
    assert got.route.startswith("full") and "no plan meets" in got.route
