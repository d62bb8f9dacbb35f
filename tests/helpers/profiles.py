"""A profile whose only frontier point is a given plan (quality 100 by fiat): the selector then
always picks that plan, so a test knows which layers the orchestrator recomputes."""
from kvrelay import profile_file


def write_profile(root, family, sender, receiver, fingerprint, num_layers, plan, more=()):
    """`more`: further frontier points as (plan, quality), e.g. a cheaper plan a little below 100."""
    point = {"plan": plan.to_list(), "layers_recomputed": plan.num_recomputed, "quality": 100.0}
    points = [{"plan": p.to_list(), "layers_recomputed": p.num_recomputed, "quality": q} for p, q in more] + [point]
    profile_file.save({
        "format": profile_file.FORMAT, "family": family, "sender": sender, "receiver": receiver,
        "sender_fingerprint": fingerprint, "receiver_fingerprint": fingerprint, "num_layers": num_layers,
        "stride": 2, "max_group_layers": num_layers,
        "dataset": {"kind": "fixed by test", "split": "profile", "samples": 1, "context_tokens": [0, 0]},
        "metric": {"name": "fixed", "description": "written by tests/serving/conftest.py"},
        "configs": points, "frontier": points,
        "baselines": {"full_prefill": {"layers_recomputed": num_layers, "quality": 100.0},
                      "full_reuse": {"layers_recomputed": 0, "quality": 50.0}},
        "command": "tests", "kvrelay_version": "test", "created": profile_file.now_utc(),
    }, profile_file.path_for(root, family, sender, receiver))
