"""Random bench adapters (kvrelay.bench.adapters) are what PEFT reads, and their cache tells
different adapters apart."""

from __future__ import annotations

import json

from helpers import user_models as um
from kvrelay.bench.adapters import random_adapters
from kvrelay.model import checkpoint as ck
from kvrelay.model.spec import read_hf_config


def test_layer_sets_scales_and_ranks_get_adapters_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRELAY_HOME", str(tmp_path / "home"))
    base = um.make_base(tmp_path / "base")
    cfg = read_hf_config(base)
    made = {
        "all": random_adapters(base, 1, 4)[0],
        "run": random_adapters(base, 1, 4, layers=(1, 2, 3))[0],
        "gap": random_adapters(base, 1, 4, layers=(1, 3))[0],
        "scale": random_adapters(base, 1, 4, scale=0.02)[0],
        "rank": random_adapters(base, 1, 8)[0],
    }
    assert len(set(made.values())) == len(made), made  # no two share a cached directory
    for what, d in made.items():
        adapter = ck.read_adapter(d, cfg)  # the registration checker accepts each
        layers = {m.layer for m in adapter.modules}
        want = {"run": {1, 2, 3}, "gap": {1, 3}}.get(what, set(range(cfg["num_hidden_layers"])))
        assert layers == want, (what, layers)
    assert json.loads((made["gap"] / ck.ADAPTER_CONFIG).read_text())["layers_to_transform"] == [1, 3]
    assert random_adapters(base, 1, 4, layers=(1, 3))[0] == made["gap"]  # kept, not made again
