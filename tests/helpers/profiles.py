"""Profiles for tests: `write_profile`, whose only frontier point is a given plan (quality 100 by
fiat, so a test knows which layers the orchestrator recomputes), and `make_profile`, a valid
measured-looking profile."""

import copy

from kvrelay.model import profile_file as pf


def write_profile(root, family, sender, receiver, fingerprint, num_layers, plan, more=()):
    """`more`: further frontier points as (plan, quality), e.g. a cheaper plan a little below 100."""
    point = {"plan": plan.to_list(), "layers_recomputed": plan.num_recomputed, "quality": 100.0}
    points = [{"plan": p.to_list(), "layers_recomputed": p.num_recomputed, "quality": q} for p, q in more] + [point]
    pf.save(
        {
            "format": pf.FORMAT,
            "family": family,
            "sender": sender,
            "receiver": receiver,
            "sender_fingerprint": fingerprint,
            "receiver_fingerprint": fingerprint,
            "num_layers": num_layers,
            "stride": 2,
            "max_group_layers": num_layers,
            "dataset": {"kind": "fixed by test", "split": "profile", "samples": 1, "context_tokens": [0, 0]},
            "metric": {"name": "fixed", "description": "written by tests/serving/conftest.py"},
            "configs": points,
            "frontier": points,
            "baselines": {
                "full_prefill": {"layers_recomputed": num_layers, "quality": 100.0},
                "full_reuse": {"layers_recomputed": 0, "quality": 50.0},
            },
            "command": "tests",
            "kvrelay_version": "test",
            "created": pf.now_utc(),
        },
        pf.path_for(root, family, sender, receiver),
    )


# --- a valid measured-looking profile (test_profile_file, test_selector, test_evaluate) ---
FRONTIER = [([], 0, 80.0), ([[10, 12]], 2, 95.0), ([[8, 14]], 6, 99.2), ([[4, 14]], 10, 99.7)]


def make_profile(family="tiny", sender="base", receiver="code", fp="fp-test", num_layers=30, frontier=FRONTIER) -> dict:
    configs = [
        {"plan": p, "layers_recomputed": n, "quality": q, "task_quality": q / 2, "kl": 0.1} for p, n, q in frontier
    ]
    configs.append({"plan": [[0, 2]], "layers_recomputed": 2, "quality": 60.0, "task_quality": 30.0, "kl": 1.0})
    return {
        "format": pf.FORMAT,
        "family": family,
        "sender": sender,
        "receiver": receiver,
        "sender_fingerprint": fp,
        "receiver_fingerprint": fp,
        "num_layers": num_layers,
        "stride": 2,
        "max_group_layers": num_layers // 2,
        "dataset": {"kind": "mixed", "split": "profile", "samples": 3, "seed": 0, "context_tokens": [96, 128]},
        "metric": {"name": "agreement", "description": "test", "n_logits": 4},
        "configs": configs,
        "frontier": pf.pareto_frontier(configs),
        "baselines": {
            "full_prefill": {"layers_recomputed": num_layers, "quality": 100.0},
            "full_reuse": {"layers_recomputed": 0, "quality": frontier[0][2]},
        },
        "command": "kvrelay profile ...",
        "kvrelay_version": "0.1.0",
        "created": "2026-11-23T00:00:00+00:00",
    }


def write(tmp_path, data: dict):
    path = pf.path_for(tmp_path, data["family"], data["sender"], data["receiver"])
    pf.save(copy.deepcopy(data), path)
    return path
