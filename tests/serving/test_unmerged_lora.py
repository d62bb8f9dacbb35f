"""lora = "unmerged" in the serving core (no Triton): a user's LoRA variants run as adapters on the
base's one engine, a full fine-tune on its own; bad settings are clear errors."""

from __future__ import annotations

import threading

import pytest
import torch

from helpers import user_models as um
from kvrelay.errors import KvRelayError
from kvrelay.serving import deployment as dp
from kvrelay.serving.orchestrator import Orchestrator, ServeRequest
from kvrelay.store import MemoryStore

from .conftest import Collect

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("unmerged")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVRELAY_HOME", str(root / "home"))
        base = um.make_base(root / "base")
        qv = um.make_lora(base, root / "qv", seed=1)
        al = um.make_lora(base, root / "all", seed=2, target_modules=ALL)
        full = um.make_full(base, um.make_lora(base, root / "for-full", seed=3, target_modules=ALL), root / "full")
        refs = {"base": um.load(base), "qv": um.merged(base, qv), "all": um.merged(base, al), "full": um.load(full)}

        def deployment(extra: str = 'lora = "unmerged"\n') -> dp.Deployment:
            toml = root / "mine.toml"
            toml.write_text(
                f'profiles_dir = "{root / "none"}"\n{extra}\n[family]\nname = "mine"\nbase = "base"\n'
                '[family.variants]\nqv = "qv"\nall = "all"\nfull = "full"\n'
            )
            return dp.load(toml)

        deployment.root, deployment.base = root, base
        yield deployment, refs


def test_adapters_share_the_base_engine_and_a_full_checkpoint_has_its_own(family):
    deployment, _ = family
    assert dp.engine_groups(deployment()) == {"base": ["base", "qv", "all"], "full": ["full"]}
    assert dp.engine_groups(deployment("")) == {m: [m] for m in ("base", "qv", "all", "full")}  # merged default


@pytest.mark.parametrize(
    "extra, message",
    [
        ('lora = "folded"\n', "lora must be 'merged' or 'unmerged'"),
        ('lora = "unmerged"\nmax_loras = 0\n', "max_loras must be an integer >= 1"),
        (
            'lora = "unmerged"\n[models.base]\n[models.qv]\ndtype = "bfloat16"\n[models.all]\n',
            "share the 'base' engine but ask for different devices or dtypes",
        ),
    ],
)
def test_bad_settings_are_clear_errors(family, extra, message):
    deployment, _ = family
    with pytest.raises(KvRelayError, match=message):
        dp.engine_groups(deployment(extra))


def test_served_variants_decode_together_and_each_equals_its_merge(family):
    deployment, refs = family
    dep = deployment()
    core = Orchestrator(dep, store=MemoryStore(64 << 20))
    try:
        runners = core.runners
        assert runners["qv"] is runners["base"] is runners["all"] and runners["full"] is not runners["base"]
        engine = runners["base"].engine
        assert engine.adapters.keys() == {"qv", "all"}
        assert engine.blocks.num_blocks * engine.page_format.page_bytes <= dep.model("base").kv_cache_bytes
        prompts = {m: [1] + [3 + (7 * i + 5 * j) % 250 for j in range(40)] for i, m in enumerate(refs)}
        sinks = {m: Collect() for m in refs}

        def serve(m):
            core.serve(ServeRequest(tokens=prompts[m], max_tokens=10, model=m, tenant="t"), sinks[m])

        threads = [threading.Thread(target=serve, args=(m,)) for m in refs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for m, ref in refs.items():
            x = torch.tensor([prompts[m]])
            want = ref.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, pad_token_id=0
            )[0, x.shape[1] :].tolist()
            reply = sinks[m].replies[-1]
            assert reply.finished and reply.model == m and reply.output_ids == want, m
    finally:
        core.close()


def test_an_adapter_added_while_serving_is_servable_at_once_and_bad_ones_are_refused(family):
    """ServeRequest.lora_path (the Triton input lora_path): the first request registers the adapter
    under its variant name, later ones just name it; the base keeps serving meanwhile."""
    deployment, refs = family
    new = um.make_lora(deployment.base, deployment.root / "new", seed=7, target_modules=ALL)
    ref = um.merged(deployment.base, new).eval()
    core = Orchestrator(deployment(), store=MemoryStore(64 << 20))
    try:
        prompt = [1] + [3 + (11 * j) % 250 for j in range(30)]
        x = torch.tensor([prompt])
        want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0)[
            0, x.shape[1] :
        ].tolist()
        errors, base_sink = [], Collect()

        def base_load():
            try:
                for _ in range(3):
                    core.serve(ServeRequest(tokens=prompt, max_tokens=6, model="base", tenant="b"), base_sink)
            except Exception as e:  # noqa: BLE001 - any failure of the others is the bug
                errors.append(e)

        t = threading.Thread(target=base_load)
        t.start()
        first, again = Collect(), Collect()
        core.serve(ServeRequest(tokens=prompt, max_tokens=6, model="new", tenant="t", lora_path=str(new)), first)
        core.serve(ServeRequest(tokens=prompt, max_tokens=6, model="new", tenant="t"), again)
        core.serve(ServeRequest(tokens=prompt, max_tokens=6, model="new", tenant="t", lora_path=str(new)), Collect())
        t.join(120)
        assert not errors and len(base_sink.replies) == 3
        assert first.replies[-1].output_ids == want == again.replies[-1].output_ids
        assert first.replies[-1].model == "new" and core.runners["new"] is core.runners["base"]
        with pytest.raises(KvRelayError, match="already served from"):
            core.serve(
                ServeRequest(tokens=prompt, max_tokens=2, model="new", lora_path=str(deployment.root / "qv")), Collect()
            )
        with pytest.raises(KvRelayError, match="one of the deployment's models"):
            core.serve(ServeRequest(tokens=prompt, max_tokens=2, model="qv", lora_path=str(new)), Collect())
        with pytest.raises(KvRelayError, match="adapter_config.json"):
            core.serve(
                ServeRequest(tokens=prompt, max_tokens=2, model="bad", lora_path=str(deployment.root)), Collect()
            )
        with pytest.raises(KvRelayError, match="unknown model 'bad'"):  # nothing was registered
            core.serve(ServeRequest(tokens=prompt, max_tokens=2, model="bad"), Collect())
    finally:
        core.close()
    merged = Orchestrator(deployment(""), store=MemoryStore(16 << 20))
    try:
        with pytest.raises(KvRelayError, match='only with lora = "unmerged"'):
            merged.serve(ServeRequest(tokens=[1, 5, 6], max_tokens=2, model="new", lora_path=str(new)), Collect())
    finally:
        merged.close()


class _Prefills:
    """A Metrics that keeps each prefill's info (what the Prometheus counters are made from)."""

    def __init__(self):
        self.infos = []

    def prefill(self, entry, route, receiver, info):
        self.infos.append((receiver, info))

    def bytes_moved(self, entry, direction, n): ...
    def store_error(self, entry): ...
    def page_rejected(self, reason): ...


def test_an_adapter_over_the_upper_layers_takes_the_base_lower_layers_in_its_engine(family):
    """An adapter with PEFT layers_to_transform leaves the lower layers the base's: after the base
    served a context, the adapter's request takes those layers' KV from the base's blocks (counted,
    reported to the client) and answers exactly as its merged model does."""
    deployment, refs = family
    upper = um.make_lora(
        deployment.base, deployment.root / "upper", seed=9, target_modules=ALL, layers_to_transform=[2, 3]
    )
    ref = um.merged(deployment.base, upper).eval()
    metrics = _Prefills()
    core = Orchestrator(deployment(), store=MemoryStore(64 << 20), metrics=metrics)
    try:
        ctx = [1] + [3 + (13 * j) % 250 for j in range(95)]
        core.serve(ServeRequest(tokens=ctx + [7, 8], max_tokens=2, model="base", tenant="t"), Collect())
        prompt = ctx + [9, 10, 11]
        sink = Collect()
        core.serve(ServeRequest(tokens=prompt, max_tokens=6, model="upper", tenant="t", lora_path=str(upper)), sink)
        x = torch.tensor([prompt])
        want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0)
        reply = sink.replies[-1]
        assert reply.output_ids == want[0, x.shape[1] :].tolist()
        B = core.ids["base"].page_format.block_size
        assert (reply.donor, reply.reused_layers, reply.recomputed_layers) == ("base", 2, 2)
        assert reply.reused_tokens == len(ctx) // B * B
        receiver, info = metrics.infos[-1]
        assert receiver == "upper" and info["shared_tokens"] == reply.reused_tokens and info["shared_from"] == "base"
        other = Collect()  # another tenant's blocks are never taken
        core.serve(ServeRequest(tokens=prompt, max_tokens=1, model="upper", tenant="u"), other)
        assert other.replies[-1].reused_tokens == 0 and metrics.infos[-1][1]["shared_tokens"] == 0
    finally:
        core.close()


def test_sharing_off_keeps_every_variant_on_its_own_prefill_in_the_one_engine(family):
    """sharing = false is the no-sharing baseline of the load tests: the adapter over the upper
    layers then prefills every layer itself even though the base's blocks of the context are in
    the same engine (it took them with sharing on, above), and answers the same."""
    deployment, _ = family
    upper = um.make_lora(
        deployment.base, deployment.root / "upper-off", seed=9, target_modules=ALL, layers_to_transform=[2, 3]
    )
    metrics = _Prefills()
    core = Orchestrator(
        deployment('lora = "unmerged"\nsharing = false\n'), store=MemoryStore(64 << 20), metrics=metrics
    )
    try:
        ctx = [1] + [3 + (13 * j) % 250 for j in range(95)]
        core.serve(ServeRequest(tokens=ctx + [7, 8], max_tokens=2, model="base", tenant="t"), Collect())
        sink = Collect()
        core.serve(
            ServeRequest(tokens=ctx + [9, 10, 11], max_tokens=6, model="upper", tenant="t", lora_path=str(upper)), sink
        )
        reply = sink.replies[-1]
        assert (reply.reused_tokens, reply.reused_layers, reply.donor) == (0, 0, "")
        assert metrics.infos[-1][0] == "upper" and metrics.infos[-1][1]["shared_tokens"] == 0
    finally:
        core.close()
