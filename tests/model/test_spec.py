"""One model identity: the engine, the deployment and the store keys read the same ModelSpec."""

import pytest

from kvrelay.serving import deployment as dp
from kvrelay.engines import make_engine
from kvrelay.errors import KvRelayError
from kvrelay.families import family_spec
from kvrelay.model.spec import ModelSpec

SMALL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)


def test_built_family_identity_is_the_engines(tiny_family):
    from kvrelay.model.engine_api import EngineConfig

    fam = family_spec("tiny")
    assert not fam.synthetic and fam.models == tuple(tiny_family.models) and fam.base == "base"
    ids = dp.identities(dp.for_family("tiny"))
    for name in ("base", "code"):
        spec = fam.model(name)
        eng = make_engine("tiny", name, EngineConfig(kv_cache_bytes=8 << 20))
        assert (spec.model_id, spec.fingerprint, spec.weights) == (eng.model_id, eng.fingerprint, eng.weights)
        assert spec.page_format(16, "float32") == eng.page_format == ids[name].page_format
        assert ids[name].model_id == spec.model_id and ids[name].max_model_len == eng.max_model_len
    assert fam.model("base").fingerprint == fam.model("code").fingerprint == tiny_family.fingerprint
    assert fam.model("base").model_id != fam.model("code").model_id
    assert fam.tokenizer_dir() == tiny_family.model_dir("base")


def test_synthetic_family_identity_is_the_engines():
    fam = family_spec("llama8b-random")
    assert fam.synthetic and fam.models == ("base", "v1", "v2") and fam.tokenizer_dir() is None
    spec = fam.model("v1")
    assert spec.synthetic and spec.model_id == "v1@random-llama8b-random-seed1" and spec.num_layers == 32
    assert spec.page_format(16, "bfloat16").page_bytes > 0
    small = fam.model("v1", **SMALL)
    eng = make_engine("llama8b-random", "v1", None, **SMALL)
    assert (small.model_id, small.fingerprint) == (eng.model_id, eng.fingerprint)
    assert small.page_format(16, "float32") == eng.page_format


def test_unknown_model_and_overrides_on_a_built_family_are_refused(tiny_family):
    with pytest.raises(KvRelayError, match="has models"):
        family_spec("tiny").model("poetry")
    with pytest.raises(KvRelayError, match="cannot be overridden"):
        family_spec("tiny").model("base", num_hidden_layers=2)
    with pytest.raises(KvRelayError, match="no config.json"):
        ModelSpec.from_dir("x", tiny_family.root)
