"""Engine behaviour: scheduling, sampling, caching and refusals (tiny family)."""

import pytest
import torch

from kvrelay.model.engine_api import EngineConfig
from kvrelay.backends.torch_engine.engine import TorchEngine
from kvrelay.model.engine_api import Request, SamplingParams
from kvrelay.errors import FingerprintMismatch, KvRelayError, PlanError
from kvrelay.model.kv_format import KVPages, PageFormat
from kvrelay.model.plan import RecomputePlan


@pytest.fixture(scope="module")
def base(tiny_family):
    return TorchEngine.from_dir("base", tiny_family.model_dir("base"), EngineConfig(kv_cache_bytes=64 << 20))


@pytest.fixture(scope="module")
def code(tiny_family):
    return TorchEngine.from_dir("code", tiny_family.model_dir("code"), EngineConfig(kv_cache_bytes=64 << 20))


def toks(rng, n):
    return [rng.randrange(1000, 40000) for _ in range(n)]


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def test_continuous_batching_gives_the_same_tokens_as_running_alone(base, rng):
    prompts = [toks(rng, n) for n in (30, 70, 5, 120)]
    alone = [base.generate([Request(f"a{i}", p, greedy(10))])[f"a{i}"].output_tokens for i, p in enumerate(prompts)]
    # join while others decode: two now, two after a few steps
    base.add_request(Request("b0", prompts[0], greedy(10)))
    base.add_request(Request("b1", prompts[1], greedy(10)))
    outs, steps = {}, 0
    while base.has_unfinished():
        if steps == 3:
            base.add_request(Request("b2", prompts[2], greedy(10)))
            base.add_request(Request("b3", prompts[3], greedy(10)))
        for o in base.step():
            outs[o.request_id] = o
        steps += 1
    assert [outs[f"b{i}"].output_tokens for i in range(4)] == alone
    assert all(outs[f"b{i}"].finish_reason == "length" for i in range(4))


def test_sampling_is_seeded_and_sampled(base, rng):
    p = toks(rng, 20)
    sp = lambda seed: SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=200, seed=seed, ignore_eos=True)
    a = base.generate([Request("s1", p, sp(7))])["s1"].output_tokens
    b = base.generate([Request("s2", p, sp(7))])["s2"].output_tokens
    c = base.generate([Request("s3", p, sp(8))])["s3"].output_tokens
    g = base.generate([Request("g", p, greedy(16))])["g"].output_tokens
    assert a == b and a != c and a != g


def test_stop_tokens_end_generation(base, rng):
    p = toks(rng, 20)
    full = base.generate([Request("f", p, greedy(8))])["f"].output_tokens
    stop = full[3]
    out = base.generate([Request("s", p, SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=(stop,)))])["s"]
    assert out.output_tokens == full[: full.index(stop) + 1] and out.finish_reason == "stop"


def test_stop_sequences_end_generation(base, rng):
    p = toks(rng, 20)
    full = base.generate([Request("f2", p, greedy(10))])["f2"].output_tokens
    seq = tuple(full[4:6])
    out = base.generate([Request("s2", p, SamplingParams(max_tokens=10, ignore_eos=True, stop_sequences=(seq,)))])["s2"]
    assert tuple(out.output_tokens[-2:]) == seq and len(out.output_tokens) <= 6 and out.finish_reason == "stop"


def test_same_model_prefix_cache_and_lru_eviction(tiny_family, base, rng):
    eng = TorchEngine.from_dir(
        "base", tiny_family.model_dir("base"), EngineConfig(kv_cache_bytes=base.page_format.page_bytes * 24)
    )
    assert eng.blocks.num_blocks == 24
    p = toks(rng, 64)
    first = eng.generate([Request("1", p + [5], greedy(1))])["1"]
    again = eng.generate([Request("2", p + [6], greedy(1))])["2"]
    assert first.prefill.cached_tokens == 0 and again.prefill.cached_tokens == 64
    for i in range(6):  # push p out of the cache
        eng.generate([Request(f"x{i}", toks(rng, 90), greedy(1))])
    after = eng.generate(
        [
            Request(
                "3",
                p + [6],
                greedy(1),
            )
        ]
    )["3"]
    assert after.prefill.cached_tokens == 0
    assert after.output_tokens == again.output_tokens


def test_preemption_when_cache_runs_out_keeps_outputs_correct(tiny_family, rng):
    big = TorchEngine.from_dir("base", tiny_family.model_dir("base"), EngineConfig(kv_cache_bytes=64 << 20))
    small = TorchEngine.from_dir(
        "base",
        tiny_family.model_dir("base"),
        EngineConfig(kv_cache_bytes=big.page_format.page_bytes * 12, prefix_caching=False),
    )
    prompts = [toks(rng, 40) for _ in range(4)]  # 4 x (3..5 blocks) > 12 blocks while decoding
    want = {
        f"r{i}": big.generate([Request(f"r{i}", p, greedy(30))])[f"r{i}"].output_tokens for i, p in enumerate(prompts)
    }
    got = small.generate([Request(f"r{i}", p, greedy(30)) for i, p in enumerate(prompts)])
    assert {k: v.output_tokens for k, v in got.items()} == want


def test_abort(base, rng):
    base.add_request(Request("ab", toks(rng, 10), greedy(50)))
    base.step()
    base.abort("ab")
    outs = base.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("ab", "abort")]
    assert not base.has_unfinished()


@pytest.mark.parametrize(
    "req,msg",
    [
        (Request("e", [], greedy(1)), "empty prompt"),
        (Request("e", [1, 2], SamplingParams(max_tokens=0)), "max_tokens must be an integer in 1..4096"),
        (Request("e", [1, 2], SamplingParams(max_tokens=10**9)), "max_tokens must be"),
        (Request("e", [1] * 4090, greedy(10)), "exceeds the model's context limit of 4096"),
        (Request("e", [1, 10**6], greedy(1)), "token ids must be in 0..49151"),
        (Request("e", [1, 2], SamplingParams(temperature=-1)), "temperature must be >= 0"),
        (Request("e", [1, 2], SamplingParams(top_p=0)), "top_p must be in"),
    ],
)
def test_bad_requests_are_refused_at_once(base, req, msg):
    with pytest.raises(KvRelayError, match=msg):
        base.add_request(req)
    assert not base.has_unfinished()


def test_duplicate_request_id_refused(base):
    base.add_request(Request("dup", [1, 2, 3], greedy(2)))
    with pytest.raises(KvRelayError, match="already running"):
        base.add_request(Request("dup", [1, 2, 3], greedy(2)))
    base.generate([])


def _pages(base, rng, n_tokens=64):
    return base.generate([Request("p", toks(rng, n_tokens), greedy(1), export_pages=True)])["p"].pages


def test_bad_plans_and_donors_are_clear_errors(base, code, rng):
    pages = _pages(base, rng)
    prompt = pages.tokens + [7, 8, 9]
    L = code.num_layers
    cases = [
        (RecomputePlan(((2, 6), (4, 8))), PlanError, "overlap"),
        (RecomputePlan(((4, L + 2),)), PlanError, "out of range"),
        (RecomputePlan(((3, 5),)), PlanError, "carry E only for layers \\[2, 4, 6\\]"),
        (None, PlanError, "a donor needs a recompute plan"),
    ]
    for plan, err, msg in cases:
        with pytest.raises(err, match=msg):
            code.add_request(Request("x", prompt, greedy(1), donor=pages, plan=plan))
    foreign = KVPages(pages.format, "other-family", "0123456789abcdef", pages.tokens, pages.kv, pages.e)
    with pytest.raises(FingerprintMismatch, match="differ in architecture or tokenizer"):
        code.add_request(Request("x", prompt, greedy(1), donor=foreign, plan=RecomputePlan.none()))
    wrong_geom = PageFormat(**{**pages.format.to_dict(), "block_size": 32})
    with pytest.raises(KvRelayError, match="do not fit"):
        code.add_request(
            Request(
                "x",
                prompt,
                greedy(1),
                donor=KVPages(
                    wrong_geom,
                    "base",
                    base.fingerprint,
                    pages.tokens,
                    pages.kv.reshape(2, *wrong_geom.kv_shape),
                    pages.e.reshape(2, *wrong_geom.e_shape),
                ),
                plan=RecomputePlan.none(),
            )
        )
    with pytest.raises(KvRelayError, match="empty prompt"):
        code.add_request(Request("x", [], greedy(1), donor=pages, plan=RecomputePlan.none()))
    assert not code.has_unfinished()


def test_hybrid_pages_cannot_be_a_donor(base, code, rng):
    pages = _pages(base, rng)
    hybrid = code.generate(
        [Request("h", pages.tokens + [3], greedy(1), donor=pages, plan=RecomputePlan(((2, 4),)), export_pages=True)]
    )["h"].pages
    assert hybrid.derived_from.startswith(base.model_id + "|") and hybrid.producer == code.model_id
    with pytest.raises(KvRelayError, match="only a model's own KV can be a donor"):
        base.add_request(Request("x", pages.tokens + [3], greedy(1), donor=hybrid, plan=RecomputePlan.none()))


def test_donor_covering_another_context_reuses_only_the_shared_blocks(base, code, rng):
    pages = _pages(base, rng)  # 4 blocks
    prompt = pages.tokens[:40] + toks(rng, 30)  # shares 2 full blocks + 8 tokens
    out = code.generate([Request("x", prompt, greedy(1), donor=pages, plan=RecomputePlan.none())])["x"]
    assert out.prefill.reused_tokens == 32
    unrelated = code.generate([Request("y", toks(rng, 40), greedy(1), donor=pages, plan=RecomputePlan.none())])["y"]
    assert unrelated.prefill.reused_tokens == 0


def test_own_pages_restored_from_a_store_are_exact(tiny_family, base, rng):
    fresh = TorchEngine.from_dir("base", tiny_family.model_dir("base"), EngineConfig(kv_cache_bytes=32 << 20))
    pages = _pages(base, rng)  # "published" by another instance of base
    assert pages.producer == fresh.model_id and "@" in fresh.model_id
    prompt = pages.tokens + [11, 12]
    want = base.generate([Request("w", prompt, SamplingParams(max_tokens=1, return_logits=1))])["w"].logits[0]
    got = fresh.generate(
        [Request("g", prompt, SamplingParams(max_tokens=1, return_logits=1), donor=pages, plan=RecomputePlan.none())]
    )["g"]
    assert (got.logits[0] - want).abs().max() < 2e-4
    plain = fresh.generate([Request("p", prompt, greedy(1))])["p"]
    assert plain.prefill.cached_tokens == 64  # exact KV: a plain prefix hit afterwards


def test_hybrid_kv_never_answers_a_plain_prefix_hit(base, code, rng):
    pages = _pages(base, rng)
    prompt = pages.tokens + [3, 4]
    code.generate([Request("h", prompt, greedy(1), donor=pages, plan=RecomputePlan.none())])
    plain = code.generate([Request("p", prompt, greedy(1))])["p"]
    assert plain.prefill.cached_tokens == 0
    again = code.generate([Request("h2", prompt, greedy(1), donor=pages, plan=RecomputePlan.none())])["h2"]
    assert again.prefill.cached_tokens == 64  # same donor and plan: the hybrid blocks are reused


def test_bfloat16_engine_runs_and_stays_close(tiny_family, rng):
    f32 = TorchEngine.from_dir("base", tiny_family.model_dir("base"), EngineConfig(kv_cache_bytes=32 << 20))
    bf16 = TorchEngine.from_dir(
        "base", tiny_family.model_dir("base"), EngineConfig(kv_cache_bytes=32 << 20, dtype="bfloat16")
    )
    p = toks(rng, 40)
    a = f32.generate([Request("a", p, SamplingParams(max_tokens=1, return_logits=1))])["a"].logits[0]
    b = bf16.generate([Request("b", p, SamplingParams(max_tokens=1, return_logits=1))])["b"].logits[0]
    assert bf16.pool.kv.dtype == torch.bfloat16
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99


class _FailingDonor:
    """A streamed donor whose connection dies after the E cache arrived, mid KV load."""

    def __init__(self, pages):
        self.pages = pages
        self.format, self.producer, self.fingerprint, self.tokens = (
            pages.format,
            pages.producer,
            pages.fingerprint,
            pages.tokens,
        )
        self.num_tokens = pages.num_tokens
        self.derived_from, self.layers, self.is_reference = "", None, False

    def has_layers(self, layers):
        return True

    def e_layer(self, layer):
        return self.pages.e_layer(layer)

    def kv_layer(self, layer):
        if layer >= 5:
            raise KvRelayError("store went away")
        return self.pages.kv_layer(layer)


def test_donor_failing_mid_load_degrades_to_a_correct_full_prefill(base, code, rng):
    pages = _pages(base, rng)
    prompt = pages.tokens + [3, 4, 5]
    want = code.generate([Request("w", prompt, SamplingParams(max_tokens=3, ignore_eos=True, return_logits=1))])["w"]
    free_before = code.blocks.num_available
    got = code.generate(
        [
            Request(
                "f",
                prompt,
                SamplingParams(max_tokens=3, ignore_eos=True, return_logits=1),
                donor=_FailingDonor(pages),
                plan=RecomputePlan(((2, 4),)),
            )
        ]
    )["f"]
    assert got.output_tokens == want.output_tokens and (got.logits[0] - want.logits[0]).abs().max() < 2e-4
    assert got.prefill.donor_failed.startswith("store went away") and got.prefill.reused_tokens == 0
    assert code.blocks.num_available == free_before and not code.has_unfinished()


def test_a_repeat_reuse_sends_a_reference_while_the_hybrid_kv_is_cached(base, code, rng):
    pages = _pages(base, rng)
    prompt = pages.tokens + [3, 4]
    plan = RecomputePlan(((2, 4),))
    sp = SamplingParams(max_tokens=3, ignore_eos=True, return_logits=1)
    first = code.generate([Request("h", prompt, sp, donor=pages, plan=plan)])["h"]
    ref = pages.reference()
    assert ref.is_reference and ref.kv.numel() == 0 and ref.e.numel() == 0 and not pages.is_reference
    again = code.generate([Request("h2", prompt, sp, donor=ref, plan=plan)])["h2"]
    assert again.output_tokens == first.output_tokens and (again.logits[0] - first.logits[0]).abs().max() < 1e-5
    assert again.prefill.cached_tokens == 64 and again.prefill.reused_tokens == 64
    assert again.prefill.recomputed_layers == 2 and again.prefill.donor == base.model_id
    # A plan whose hybrid KV was never built here: no pages to build it from, so a correct full prefill.
    own = code.generate([Request("o", prompt, sp)])["o"]
    miss = code.generate([Request("m", prompt, sp, donor=ref, plan=RecomputePlan(((4, 6),)))])["m"]
    assert miss.prefill.donor_failed.startswith("the hybrid KV") and miss.prefill.reused_tokens == 0
    assert miss.output_tokens == own.output_tokens and not code.has_unfinished()


def test_min_tokens_holds_back_stops_and_bad_words_are_never_generated(base, rng):
    p = toks(rng, 40)
    free = base.generate([Request("free", p, greedy(6))])["free"].output_tokens
    first = free[0]
    stopped = base.generate([Request("stop", p, SamplingParams(max_tokens=6, stop_token_ids=(first,)))])["stop"]
    assert stopped.output_tokens == [first] and stopped.finish_reason == "stop"
    held = base.generate([Request("min", p, SamplingParams(max_tokens=6, stop_token_ids=(first,), min_tokens=4))])[
        "min"
    ]
    assert len(held.output_tokens) >= 4 and held.output_tokens[0] != first  # the stop token is masked until then
    banned = base.generate(
        [Request("bad", p, SamplingParams(max_tokens=6, ignore_eos=True, bad_sequences=((first,), tuple(free[1:3]))))]
    )["bad"]
    assert first not in banned.output_tokens
    two = [tuple(banned.output_tokens[i : i + 2]) for i in range(5)]
    assert tuple(free[1:3]) not in two


def test_min_tokens_above_max_tokens_is_refused(base):
    with pytest.raises(KvRelayError, match="min_tokens must be in 0..max_tokens"):
        base.add_request(Request("x", [1, 2, 3], SamplingParams(max_tokens=2, min_tokens=3)))
