"""LoRA adapters served unmerged by one engine over a shared base (backends/torch_engine/lora.py).

Reference: PEFT's own merge (merge_and_unload) run by HF transformers; adapters made by PEFT in the
test over a tiny random Llama. Each adapter's greedy tokens must equal its merged model's, alone and
decoded in one batch with other adapters and the base.
"""

import pytest
import torch

from kvrelay.errors import KvRelayError
from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams
from kvrelay.model.plan import RecomputePlan

from helpers import user_models as um

ATOL = 1e-4
ADAPTERS = {  # name -> PEFT LoraConfig fields (what PEFT writes for LoRA, each in one adapter)
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(
        r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}
    ),
    "rs": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "gate_proj", "up_proj"]),
    "upper": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=[2, 3]
    ),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-family")
    base = um.make_base(root / "base")
    adapters = {n: um.make_lora(base, root / n, seed=i + 1, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())}
    refs = {n: um.merged(base, d).eval() for n, d in adapters.items()}
    refs[""] = um.load(base).eval()
    return base, adapters, refs


def _engine(base, adapters, **cfg):
    from kvrelay.backends.torch_engine.engine import TorchEngine

    engine = TorchEngine.from_dir("base", base, EngineConfig(block_size=16, kv_cache_bytes=64 << 20, **cfg))
    for n, d in adapters.items():
        engine.add_adapter(n, d)
    return engine


def _prompt(seed: int, n: int = 37) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(um.VOCAB), (n,), generator=g).tolist()


def _reference(model, prompt, n):
    """HF greedy generate on the merged model, and its logits at each generated step."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences[0, len(prompt) :].tolist(), [x[0] for x in out.logits]


def _req(rid, prompt, adapter="", n=8, **kw):
    return Request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True, return_logits=n), adapter=adapter, **kw)


def test_each_adapter_alone_equals_peft_merge(family):
    base, adapters, refs = family
    engine = _engine(base, adapters)
    for i, name in enumerate(["", *ADAPTERS]):
        prompt = _prompt(i)
        out = engine.generate([_req(name or "b", prompt, name)])[name or "b"]
        tokens, logits = _reference(refs[name], prompt, 8)
        assert out.output_tokens == tokens, name
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, logits)) < ATOL, name


def test_mixed_adapters_decode_in_one_batch_each_equal_to_its_merge(family):
    base, adapters, refs = family
    engine = _engine(base, adapters, max_loras=4)
    names = ["", "qv", "all", "rs", "upper", "qv", ""]  # two on one adapter, two on the base
    reqs = [_req(f"r{i}", _prompt(10 + i, 20 + 3 * i), n) for i, n in enumerate(names)]
    for r in reqs:
        engine.add_request(r)
    steps, outs = 0, {}
    while engine.has_unfinished():
        got = engine.step()
        steps += 1
        for o in got:
            outs.setdefault(o.request_id, []).append(o)
    # one step admits all 7 (prefill + first token), then 7 more decode the rest together
    assert steps == 8, steps
    for r, name in zip(reqs, names):
        tokens, _ = _reference(refs[name], r.prompt_tokens, 8)
        assert outs[r.request_id][-1].output_tokens == tokens, (r.request_id, name)


def test_fewer_slots_than_adapters_swaps_them_lru_and_stays_exact(family):
    base, adapters, refs = family
    engine = _engine(base, adapters, max_loras=1)
    names = ["qv", "all", "rs", "qv", "upper"]
    reqs = [_req(f"s{i}", _prompt(30 + i), n, n=5) for i, n in enumerate(names)]
    for r in reqs:
        engine.add_request(r)
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            done[o.request_id] = o
        assert len(engine.resident_adapters) <= 1
        assert len({s.req.adapter for s in engine.running}) <= 1  # the one slot is pinned by the runners
    for r, name in zip(reqs, names):
        assert done[r.request_id].output_tokens == _reference(refs[name], r.prompt_tokens, 5)[0], name


def test_prefix_cache_never_shares_blocks_across_weights(family):
    base, adapters, _ = family
    engine = _engine(base, {"qv": adapters["qv"]})
    prompt = _prompt(50, 70)  # 4 full blocks
    first = engine.generate([_req("a", prompt, "", n=2)])["a"].prefill
    other = engine.generate([_req("b", prompt, "qv", n=2)])["b"].prefill
    again = engine.generate([_req("c", prompt, "qv", n=2)])["c"].prefill
    assert first.cached_tokens == 0 and other.cached_tokens == 0  # the base's blocks are not qv's
    assert other.shared_tokens == 0  # qv changes layer 0: no layer of its KV is the base's
    assert again.cached_tokens == 64  # qv's own blocks are


def test_adapter_takes_the_lower_layers_it_leaves_untouched_from_the_base_bit_exact(family):
    """ "upper" (layers_to_transform [2, 3]) over a 4-layer base: after the base computed a context,
    the adapter's prefill takes layers 0-1 of its blocks as they are and recomputes layers 2-3 from
    the base's E at layer 2; outputs equal the merged model's and the KV equals its own full prefill."""
    base, adapters, refs = family
    engine = _engine(base, {"upper": adapters["upper"], "qv": adapters["qv"]})
    ctx = _prompt(90, 64)  # 4 full blocks
    prompt = ctx + _prompt(91, 9)
    engine.generate([_req("b0", ctx + _prompt(92, 5), "", n=2)])
    out = engine.generate([_req("u", prompt, "upper", n=8)])["u"]
    p = out.prefill
    assert (p.shared_tokens, p.shared_layers, p.shared_from, p.cached_tokens) == (64, 2, "base", 0)
    assert out.output_tokens == _reference(refs["upper"], prompt, 8)[0]
    shared_kv = _context_kv(engine, prompt, "upper")
    alone = _engine(base, {"upper": adapters["upper"]})  # nothing cached: its own full prefill
    alone.generate([_req("u", prompt, "upper", n=1)])
    assert torch.equal(shared_kv[:, :2], _context_kv(alone, prompt, "upper")[:, :2])  # taken as they are
    assert (shared_kv - _context_kv(alone, prompt, "upper")).abs().max() < ATOL
    # the shared blocks are the adapter's own from now on: a repeat is a plain prefix hit
    assert engine.generate([_req("u2", prompt, "upper", n=1)])["u2"].prefill.cached_tokens == 64
    # the other way: the base takes layers 0-1 from the adapter's blocks of a context it has not seen
    ctx2 = _prompt(93, 48)
    engine.generate([_req("u3", ctx2 + _prompt(94, 3), "upper", n=1)])
    b = engine.generate([_req("b1", ctx2 + _prompt(95, 4), "", n=8)])["b1"]
    assert (b.prefill.shared_tokens, b.prefill.shared_from) == (48, "upper")
    assert b.output_tokens == _reference(refs[""], ctx2 + _prompt(95, 4), 8)[0]
    # an adapter that changes layer 0 never takes any; another tenant's blocks are never taken
    assert engine.generate([_req("q", prompt, "qv", n=1)])["q"].prefill.shared_tokens == 0
    salted = _req("s", _prompt(96, 40) + [5], "upper", n=1, cache_salt=b"tenant-b")
    engine.generate([_req("s0", _prompt(96, 40) + [6], "", n=1)])
    assert engine.generate([salted])["s"].prefill.shared_tokens == 0


def _context_kv(engine, prompt, adapter):
    """The cached KV of the prompt's full blocks under the adapter's own scope: [blocks, L, 2, H, B, D]."""
    from kvrelay.model.kv_format import block_hashes

    seq_scope = engine._scope(
        type("S", (), {"req": _req("x", prompt, adapter), "model_id": engine.adapters[adapter]})()
    )
    hashes = block_hashes(prompt, engine.page_format.block_size, salt=seq_scope)
    blocks = [engine.blocks.by_hash[h] for h in hashes[: len(prompt) // engine.page_format.block_size]]
    return engine.pool.kv[torch.tensor(blocks)].clone()


def test_adapter_pages_carry_its_identity_and_k_v_correction_is_exact(family):
    """Pages exported by an adapter's request name the adapter's weights; corrected reuse of its own
    pages (K, V rebuilt with its low-rank q/k/v terms) equals its full prefill."""
    from kvrelay.backends.torch_engine.engine import TorchEngine

    base, adapters, _ = family
    cfg = EngineConfig(block_size=16, kv_cache_bytes=64 << 20, e_layers=(1, 2, 3), prefix_caching=False)
    engine = TorchEngine.from_dir("base", base, cfg)
    engine.add_adapter("upper", adapters["upper"], model_id="upper@test")
    ctx = _prompt(60, 64)
    own = engine.generate([_req("own", ctx + _prompt(61, 5), "upper", export_pages=True)])["own"].pages
    assert own.producer == "upper@test"
    prompt = ctx + _prompt(62, 7)
    full = engine.generate([_req("full", prompt, "upper", n=4)])["full"]
    for plan in (RecomputePlan((), True), RecomputePlan(((1, 3),), True)):
        out = engine.generate([_req(str(plan), prompt, "upper", n=4, donor=own, plan=plan)])[str(plan)]
        assert out.prefill.reused_tokens == 64 and out.output_tokens == full.output_tokens, plan
        assert (out.logits[0] - full.logits[0]).abs().max() < ATOL, plan


def test_registering_bad_adapters_is_a_clear_error_and_leaves_the_others(family, tmp_path):
    base, adapters, refs = family
    engine = _engine(base, {"qv": adapters["qv"]})
    wide = um.make_base(tmp_path / "wide", hidden_size=96)
    with pytest.raises(KvRelayError, match="lora_A.weight has shape"):
        engine.add_adapter("wide", um.make_lora(wide, tmp_path / "wide-lora"))
    with pytest.raises(KvRelayError, match="adapter_config.json"):
        engine.add_adapter("missing", tmp_path / "nowhere")
    with pytest.raises(KvRelayError, match="already registered"):
        engine.add_adapter("qv", adapters["all"])
    with pytest.raises(KvRelayError, match="no adapter 'nope'"):
        engine.add_request(_req("x", _prompt(1), "nope"))
    assert engine.adapters.keys() == {"qv"}
    prompt = _prompt(70)
    assert engine.generate([_req("ok", prompt, "qv")])["ok"].output_tokens == _reference(refs["qv"], prompt, 8)[0]


def test_removed_adapter_refuses_new_requests_and_aborts_queued_ones_with_the_reason(family):
    base, adapters, refs = family
    engine = _engine(base, {"qv": adapters["qv"], "all": adapters["all"]})
    engine.add_request(_req("running", _prompt(80), "all"))
    engine.step()  # admitted: pinned, keeps its weights
    engine.add_request(_req("queued", _prompt(81), "qv"))
    engine.remove_adapter("qv")
    engine.remove_adapter("all")
    with pytest.raises(KvRelayError, match="no adapter 'qv'"):
        engine.add_request(_req("late", _prompt(82), "qv"))
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            done[o.request_id] = o
    assert done["queued"].finish_reason == "abort" and "was removed" in done["queued"].error
    assert done["running"].output_tokens == _reference(refs["all"], _prompt(80), 8)[0]
    engine.add_adapter("qv", adapters["qv"])  # and back, servable at once
    assert (
        engine.generate([_req("back", _prompt(83), "qv")])["back"].output_tokens
        == _reference(refs["qv"], _prompt(83), 8)[0]
    )
