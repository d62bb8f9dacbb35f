"""A family registered from a user's own directories (a base, a q/v PEFT adapter, an all-linear PEFT
adapter, a merged full checkpoint) served by a real tritonserver with lora = "unmerged" (the base and
both adapters in one engine, the full checkpoint in its own): a plain tritonclient query per variant
answers what HF transformers generates on that variant (greedy, same prompt), token for token, alone
and with all four asked at once (decoded in one batch)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import user_models as um
from kvrelay.model import tokenizer as tk
from kvrelay.server import client
from kvrelay.serving import deployment as dp

from .conftest import Running

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTEXT = " ".join(f"w{(11 * i) % 250}" for i in range(120))
QUESTIONS = {"base": "w3 w4 w5", "qv": "w7 w8", "all": "w9 w10 w11 w12", "full": "w13"}
MAX_TOKENS = 12
LATE: dict = {}  # an adapter the server does not know at start (registered by a request)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("byom")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVRELAY_HOME", str(root / "home"))  # the server's stubs inherit it
        base = um.make_base(root / "base")
        qv = um.make_lora(base, root / "qv", seed=1)
        al = um.make_lora(base, root / "all", seed=2, target_modules=ALL)
        full = um.make_full(base, um.make_lora(base, root / "for-full", seed=3, target_modules=ALL), root / "full")
        toml = root / "mine.toml"
        toml.write_text(
            f'profiles_dir = "{root / "no-profiles"}"\nmax_tokens_limit = 64\nlora = "unmerged"\n\n'
            '[family]\nname = "mine"\n'
            'base = "base"\n[family.variants]\nqv = "qv"\nall = "all"\nfull = "full"\n'
        )
        dep = dp.validate(dp.load(toml))
        refs = {"base": um.load(base), "qv": um.merged(base, qv), "all": um.merged(base, al), "full": um.load(full)}
        late = um.make_lora(base, root / "late", seed=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
        upper = um.make_lora(base, root / "upper", seed=5, target_modules=ALL, layers_to_transform=[2, 3])
        r = Running(dep, root / "server")
        try:
            LATE.update(dir=late, ref=um.merged(base, late), upper=upper, upper_ref=um.merged(base, upper))
            yield r.server, refs
        finally:
            r.close()


def _hf(model, ids: list[int]) -> list[int]:
    # the prompt holds <unk> (id 0 = pad): an explicit mask, or generate() would mask those positions out
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_variant_answers_what_transformers_generates(served, protocol):
    server, refs = served
    tok = um.tokenizer()
    url = server.http_url if protocol == "http" else server.grpc_url
    for m, ref in refs.items():
        got = client.infer(url, QUESTIONS[m], MAX_TOKENS, protocol=protocol, model=m, context=CONTEXT, tenant="t")
        want = _hf(ref, sum(tk.prompt_ids(tok, CONTEXT, QUESTIONS[m]), []))
        assert got.info["variant"] == m
        assert got.info["output_tokens"] == len(want), (m, got.info)
        assert got.text == tk.decode(tok, want), m


def test_the_variants_differ_so_the_check_means_something(served):
    _, refs = served
    ids = sum(tk.prompt_ids(um.tokenizer(), CONTEXT, "w3"), [])
    outs = {m: tuple(_hf(ref, ids)) for m, ref in refs.items()}
    assert len(set(outs.values())) == len(outs), outs


def test_all_variants_at_once_each_answer_their_own(served):
    """Four clients at once: the base and both adapters decode in one engine batch; each still
    gets its own variant's tokens."""
    server, refs = served
    tok = um.tokenizer()

    def ask(m):
        return m, client.infer(server.http_url, QUESTIONS[m], MAX_TOKENS, model=m, context=CONTEXT, tenant="c")

    with ThreadPoolExecutor(len(refs)) as pool:
        got = dict(pool.map(ask, list(refs) * 2))
    for m, ref in refs.items():
        assert got[m].text == tk.decode(tok, _hf(ref, sum(tk.prompt_ids(tok, CONTEXT, QUESTIONS[m]), []))), m


def test_an_adapter_registered_on_the_running_server_answers_within_seconds(served):
    """The first request naming a new variant with lora_path (a directory on the server) registers it;
    later requests name it alone, over either protocol. A bad directory is a clear error."""
    server, _ = served
    late, ref = LATE["dir"], LATE["ref"]
    tok = um.tokenizer()
    want = tk.decode(tok, _hf(ref, sum(tk.prompt_ids(tok, CONTEXT, "w20 w21"), [])))
    t0 = time.perf_counter()
    got = client.infer(server.http_url, "w20 w21", MAX_TOKENS, model="late", context=CONTEXT, lora_path=str(late))
    first_s = time.perf_counter() - t0
    assert got.info["variant"] == "late" and got.text == want
    again = client.infer(server.grpc_url, "w20 w21", MAX_TOKENS, protocol="grpc", model="late", context=CONTEXT)
    assert again.text == want
    assert first_s < 30, first_s  # registration + the request; measured in docs/lora-serving.md
    with pytest.raises(Exception, match="adapter_config.json"):
        client.infer(server.http_url, "w1", 2, model="broken", lora_path=str(late.parent / "nowhere"))


def test_an_adapter_over_the_upper_layers_takes_the_base_lower_layers_counted_in_metrics(served):
    """An adapter with PEFT layers_to_transform = [2, 3] (of 4 layers), registered on the running
    server: after the base answered over a context, the adapter's answer over it takes layers 0-1 of
    the base's blocks bit-exact in the shared engine (kv_donor_model, kv_reused_layers, and
    kvrelay_shared_layer_tokens_total on /metrics) and equals its PEFT merge's."""
    import urllib.request

    server, _ = served
    tok = um.tokenizer()
    ctx = " ".join(f"w{(17 * i) % 250}" for i in range(120))
    client.infer(server.http_url, "w1", 2, model="base", context=ctx, tenant="s")
    want = tk.decode(tok, _hf(LATE["upper_ref"], sum(tk.prompt_ids(tok, ctx, "w30 w31"), [])))
    got = client.infer(
        server.http_url, "w30 w31", MAX_TOKENS, model="upper", context=ctx, tenant="s", lora_path=str(LATE["upper"])
    )
    assert got.text == want
    assert (got.info["kv_donor_model"], got.info["kv_reused_layers"], got.info["kv_recomputed_layers"]) == (
        "base",
        2,
        2,
    )
    assert got.info["kv_reused_tokens"] > 0
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("kvrelay_shared_layer_tokens_total") and "upper" in x)
    assert 'donor="base"' in line and float(line.split()[-1]) == got.info["kv_reused_tokens"]
