"""K/V correction (plan "+kv") and teacher-forced prompt logits: exactness on both families.

- corrected reuse from the receiver's *own* pages (E at every layer) == its full prefill;
- a corrected layer's K, V == the receiver's projections of the donor's E entering it;
- prompt_logits rows == the unpaged forward's, for full prefill and for re-prefill.
"""

import pytest
import torch

from kvrelay.errors import PlanError
from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams
from kvrelay.model.plan import RecomputePlan

from test_exactness import ATOL, _case, _tokens


def _all_e(engine):
    from kvrelay.backends.torch_engine.engine import TorchEngine

    L = engine.num_layers
    cfg = EngineConfig(block_size=16, kv_cache_bytes=256 << 20, e_layers=tuple(range(1, L)))
    return TorchEngine.from_dir(engine.name, engine.model_dir, cfg)


@pytest.fixture(scope="module")
def all_e_pair(pair):
    family, S, R = pair
    return family, _all_e(S), _all_e(R)


def _run(engine, prompt, plan=None, donor=None, rid="r", tail=0):
    sp = SamplingParams(max_tokens=1, return_logits=1, prompt_logits=tail)
    return engine.generate([Request(rid, prompt, sp, donor=donor, plan=plan, export_pages=True)])[rid]


def test_plan_text_round_trips_and_names_its_e_layers():
    p = RecomputePlan.parse("4-8+kv")
    assert p.correct_kv and str(p) == "4-8+kv" and RecomputePlan.parse(str(p)) == p
    assert str(RecomputePlan.parse("none+kv")) == "none+kv"
    assert p.e_layers_needed(10) == [1, 2, 3, 4, 8, 9]  # every reused layer > 0, and the group start
    assert p.kv_layers_needed(10) == []  # no donor KV at all
    assert RecomputePlan.parse("4-8").kv_layers_needed(10) == [0, 1, 2, 3, 8, 9]
    with pytest.raises(PlanError):
        p.e_layers_needed()


def test_corrected_reuse_of_own_pages_equals_full_prefill(all_e_pair, rng):
    family, _, R = all_e_pair
    ctx, _, p_r = _case(rng, family, R)
    own = _run(R, ctx + _tokens(rng, R, 5), rid="own").pages
    full = _run(R, p_r, rid="full")
    L = R.num_layers
    for plan in (RecomputePlan((), True), RecomputePlan(((2, 4),), True)):
        out = _run(R, p_r, plan, own, rid=str(plan))
        assert out.prefill.reused_tokens >= 5 * 16 and out.prefill.plan == str(plan)
        assert (out.logits[0] - full.logits[0]).abs().max() < ATOL, plan
        n = out.pages.num_pages
        assert (out.pages.kv[:n] - full.pages.kv[:n]).abs().max() < ATOL, plan
    assert L > 4


def test_corrected_layers_are_the_receivers_projections_of_donor_e(all_e_pair, rng):
    family, S, R = all_e_pair
    ctx, p_s, p_r = _case(rng, family, S)
    donor = _run(S, p_s, rid="donor").pages
    plain = _run(R, p_r, RecomputePlan.none(), donor, rid="plain")
    fixed = _run(R, p_r, RecomputePlan((), True), donor, rid="fixed")
    own = _run(R, p_r, rid="own")
    n = fixed.prefill.reused_tokens // 16
    # layer 0's input is the receiver's own embedding: corrected == its own KV, where plain reuse is the donor's
    assert (fixed.pages.kv[:n, 0] - own.pages.kv[:n, 0]).abs().max() < ATOL
    assert torch.equal(plain.pages.kv[:n, 0], donor.kv[:n, 0])
    l = R.num_layers // 2
    with torch.no_grad():
        pos = torch.arange(n * 16)
        cos, sin = R.model.rope(pos, l)
        k, v = R.model.layers[l].project_kv(donor.e_layer(l)[: n * 16], cos, sin)
    got = fixed.pages.kv[:n, l]  # [n, 2, H, B, D]
    assert (got[:, 0].permute(0, 2, 1, 3).reshape(n * 16, *k.shape[1:]) - k).abs().max() < ATOL
    assert (got[:, 1].permute(0, 2, 1, 3).reshape(n * 16, *v.shape[1:]) - v).abs().max() < ATOL


def test_correction_without_e_at_reused_layers_is_a_plan_error(pair, rng):
    family, S, R = pair  # default pages: E at even layers only
    ctx, p_s, p_r = _case(rng, family, S)
    donor = _run(S, p_s, rid="donor").pages
    with pytest.raises(PlanError, match="corrects K/V"):
        R.add_request(Request("x", p_r, SamplingParams(max_tokens=1), donor=donor, plan=RecomputePlan((), True)))


def test_prompt_logits_equal_unpaged_forward(pair, rng):
    family, S, R = pair
    ctx, p_s, p_r = _case(rng, family, S)
    dense = R.forward_dense(p_r)
    out = _run(R, p_r, rid="full", tail=7)
    assert out.prompt_logits.shape == (7, R.cfg.vocab_size)
    assert (out.prompt_logits - dense[-7:]).abs().max() < ATOL
    assert (out.prompt_logits[-1] - out.logits[0]).abs().max() == 0
    # re-prefill recomputing every layer: the same rows, and the tail is computed, not reused
    donor = _run(S, p_s, rid="donor").pages
    re = _run(R, p_r, RecomputePlan.all(R.num_layers), donor, rid="re", tail=40)
    assert re.prefill.reused_tokens <= len(p_r) - 40
    assert (re.prompt_logits - dense[-40:]).abs().max() < ATOL
