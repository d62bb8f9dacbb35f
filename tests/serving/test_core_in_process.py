"""The serving core without Triton: real tiny engines on their runner threads, a real memory store."""

import threading

import pytest

from kvrelay.errors import KvRelayError
from kvrelay.serving.engine_runner import EngineFailure
from kvrelay.serving.orchestrator import ClientGone, Orchestrator, ServeRequest
from kvrelay.store import MemoryStore

from .conftest import Collect, deployment

CTX = list(range(300, 300 + 16 * 12))  # 12 blocks of context


@pytest.fixture(scope="module")
def core(test_profiles):
    o = Orchestrator(deployment(test_profiles), store=MemoryStore(256 << 20))
    yield o
    o.close()


def ask(core, model, tokens, tenant, stream=False, max_tokens=4):
    sink = Collect()
    core.serve(ServeRequest(tokens=tokens, max_tokens=max_tokens, model=model, tenant=tenant, stream=stream), sink)
    return sink.replies


def published(core):
    core.router.flush()


def test_miss_then_reuse_then_a_repeat_sends_a_page_reference(core):
    first = ask(core, "code", CTX + [1, 2], "t1")[-1]
    assert first.route == "full: miss" and first.output_tokens == 4 and first.finished
    published(core)
    reuse = ask(core, "base", CTX + [3], "t1")[-1]
    assert reuse.route.startswith("reuse") and (reuse.donor, reuse.reused_layers, reuse.recomputed_layers) == (
        "code",
        6,
        2,
    )
    again = ask(core, "base", CTX + [3], "t1")[-1]
    assert again.route.endswith("hybrid KV cached in the engine") and again.output_ids == reuse.output_ids


def test_a_repeat_on_the_same_model_is_a_prefix_hit_with_its_tokens_counted(core):
    first = ask(core, "code", CTX + [21], "t7")[-1]
    again = ask(core, "code", CTX + [22, 23], "t7")[-1]
    assert first.route == "full: miss"
    assert again.route == "prefix: own prefix: engine cache" and again.reused_tokens == len(CTX)
    assert again.donor == "" and again.recomputed_layers == 0


def test_recompute_all_equals_the_receivers_own_prefill(core):
    ask(core, "base", CTX + [5], "t2")
    published(core)
    reuse = ask(core, "code", CTX + [6, 7], "t2")[-1]  # base -> code recomputes all 8 layers
    own = ask(core, "code", CTX + [6, 7], "t2-alone")[-1]
    assert reuse.route.startswith("reuse") and own.route == "full: miss" and reuse.output_ids == own.output_ids


def test_streaming_sends_every_token_and_tenants_stay_apart(core):
    replies = ask(core, "base", CTX + [9], "t3", stream=True, max_tokens=5)
    assert [r.output_tokens for r in replies] == [1, 2, 3, 4, 5] and replies[-1].finished
    assert [r.prev_len for r in replies] == [0, 1, 2, 3, 4]
    published(core)
    assert ask(core, "code", CTX + [9], "t3-other")[-1].route == "full: miss"


def test_a_client_that_leaves_frees_its_engine_slot(core):
    sink = Collect(leave_after=1)
    with pytest.raises(ClientGone):
        core.serve(ServeRequest(tokens=CTX + [11], max_tokens=200, model="base", tenant="t4", stream=True), sink)
    assert len(sink.replies) == 1
    assert all(r.in_flight == 0 for r in core.runners.values())


def test_a_cancelled_stream_stops_within_a_few_tokens(core):
    class Cancelled(Collect):
        def cancelled(self):
            return len(self.replies) >= 2  # Triton says the client cancelled after two tokens

    sink = Cancelled()
    with pytest.raises(ClientGone):
        core.serve(ServeRequest(tokens=CTX + [12], max_tokens=200, model="base", tenant="t4", stream=True), sink)
    assert 2 <= len(sink.replies) <= 8
    assert all(r.in_flight == 0 for r in core.runners.values())


@pytest.mark.parametrize(
    "req,msg",
    [
        (ServeRequest(tokens=[1, 2], max_tokens=4, model="nope"), "unknown model 'nope'"),
        (ServeRequest(tokens=[1, 2], max_tokens=0), "max_tokens must be in 1..256"),
        (ServeRequest(tokens=[], max_tokens=4), "the prompt is empty"),
        (ServeRequest(tokens=[1] * 4095, max_tokens=4), "exceeds the 4096-token context"),
        (ServeRequest(tokens=[10**9], max_tokens=4), "token ids must be in"),
        (ServeRequest(tokens=[1, 2], max_tokens=4, tenant="t" * 10_000), "tenant must be at most 128 printable"),
        (ServeRequest(tokens=[1, 2], max_tokens=4, tenant="a\nb"), "tenant must be at most 128 printable"),
        (ServeRequest(tokens=[1, 2], max_tokens=4, request_id="r" * 129), "request_id must be at most 128"),
    ],
)
def test_bad_input_is_a_clear_error(core, req, msg):
    with pytest.raises(KvRelayError, match=msg):
        core.serve(req, Collect())


def test_an_engine_failure_fails_its_requests_and_the_engine_keeps_serving(core):
    runner = core.runners["code"]
    real_step, calls = runner.engine.step, []

    def broken():
        if not calls:
            calls.append(1)
            raise RuntimeError("injected")
        return real_step()

    runner.engine.step = broken
    try:
        with pytest.raises(EngineFailure, match="engine failure: injected"):
            ask(core, "code", [5, 6, 7], "t5")
    finally:
        runner.engine.step = real_step
    assert ask(core, "code", [5, 6, 7], "t5")[-1].output_tokens == 4


def test_concurrent_requests_all_answered(core):
    out, errors = [], []

    def one(i):
        try:
            out.append(ask(core, ("base", "code")[i % 2], CTX[: 16 * (1 + i % 4)] + [i], f"t6-{i % 3}")[-1])
        except Exception as e:  # pragma: no cover - a failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(out) == 16 and all(r.output_tokens == 4 for r in out)
