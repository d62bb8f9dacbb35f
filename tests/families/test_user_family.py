"""Bring your own models: a base directory, PEFT adapters and a full fine-tune made by transformers and
PEFT directly (tests/helpers/user_models.py), registered with `kvrelay models add`, listed, removed,
refused with a clear error when they do not fit, and noticed when a file changes afterwards. The
engine's weights of every variant equal PEFT's merge_and_unload() and its greedy output equals HF
transformers' on the same merged model, token for token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import user_models as um
from kvrelay.errors import FamilyChanged, KvRelayError
from kvrelay.families import registry, user
from kvrelay.model import checkpoint as ck

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One user's directories: a base, a q/v adapter, an all-linear adapter, a merged full checkpoint."""
    root = tmp_path_factory.mktemp("user-models")
    base = um.make_base(root / "base")
    qv = um.make_lora(base, root / "qv", seed=1)
    al = um.make_lora(base, root / "all", seed=2, target_modules=ALL)
    full = um.make_full(base, al, root / "full")
    return {"root": root, "base": base, "qv": qv, "all": al, "full": full}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRELAY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def kvrelay(*argv, env_home=None, timeout=300):
    env = dict(os.environ, **({"KVRELAY_HOME": str(env_home)} if env_home else {}))
    return subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", *map(str, argv)], capture_output=True, text=True, timeout=timeout, env=env
    )


def _nothing_left(home: Path, name: str) -> None:
    fams = home / "families"
    assert not (fams / name).exists(), "a refused family was registered"
    assert not list(fams.glob(f".{name}.building-*")) if fams.exists() else True, "a half-registered family is left"


# --- add / list / remove ---------------------------------------------------------------------------


def test_add_list_remove_through_the_cli(dirs, home):
    r = kvrelay(
        "models",
        "add",
        "mine",
        "--base",
        dirs["base"],
        "--variant",
        f"qv={dirs['qv']}",
        "--variant",
        f"all={dirs['all']}",
        "--variant",
        f"full={dirs['full']}",
        env_home=home,
    )
    assert r.returncode == 0, r.stderr
    assert "nothing copied" in r.stdout
    fam = registry.load_family("mine")
    assert list(fam.models) == ["base", "qv", "all", "full"]
    for m in fam.models:  # symlinks only: not a byte of weights copied
        assert all(p.is_symlink() for p in fam.model_dir(m).iterdir() if not p.name.startswith(".kvrelay"))
    listing = kvrelay("models", "list", env_home=home).stdout
    assert "mine" in listing and "registered" in listing
    assert "LoRA r=4 alpha=8 on q_proj,v_proj (merged at load, or unmerged" in listing
    assert f"LoRA r=4 alpha=8 on {','.join(ALL)}" in listing and "full checkpoint" in listing
    weights = fam.manifest()["weights"]
    assert len(set(weights.values())) == 4, "each model has its own weights digest"
    assert all(weights[m] in listing for m in fam.models)

    again = kvrelay("models", "add", "mine", "--base", dirs["base"], env_home=home)
    assert again.returncode == 2 and "already registered" in again.stderr and "--replace" in again.stderr

    r = kvrelay("models", "remove", "mine", env_home=home)
    assert r.returncode == 0, r.stderr
    assert not registry.family_dir("mine").exists()
    assert (dirs["qv"] / ck.ADAPTER_CONFIG).is_file() and (dirs["base"] / "model.safetensors").is_file()
    gone = kvrelay("models", "remove", "mine", env_home=home)
    assert gone.returncode == 2 and "unknown model family 'mine'" in gone.stderr
    built = kvrelay("models", "remove", "tiny", env_home=home)
    assert built.returncode == 2 and "a family kvrelay builds" in built.stderr


def test_a_deployment_file_alone_describes_the_family(dirs, home, tmp_path):
    from kvrelay.serving import deployment as dp

    f = tmp_path / "mine.toml"
    rel = os.path.relpath(dirs["root"], tmp_path)
    f.write_text(f'[family]\nname = "mine"\nbase = "{rel}/base"\n[family.variants]\nqv = "{rel}/qv"\n')
    dep = dp.load(f)
    assert dep.family == "mine" and [m.name for m in dep.models] == ["base", "qv"]
    created = registry.load_family("mine").manifest()["created"]
    assert dp.load(f).family == "mine"
    assert registry.load_family("mine").manifest()["created"] == created, "an unchanged table registers nothing"
    f.write_text('[family]\nname = "mine"\n')
    with pytest.raises(KvRelayError, match=r"\[family\]: field 'base' is required"):
        dp.load(f)


# --- the weights an engine loads -------------------------------------------------------------------


def _engine_state(view: Path) -> dict[str, torch.Tensor]:
    from kvrelay.backends.torch_engine.weights import read_weights

    return read_weights(view)


def _peft_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in um.merged(base, adapter).state_dict().items()}


LORAS = {
    "qv": dict(),
    "all-linear": dict(target_modules=ALL, r=8, lora_alpha=16),
    "patterns": dict(
        target_modules=ALL, rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3.0}
    ),
    "rslora": dict(target_modules=["q_proj", "up_proj"], use_rslora=True, r=8, lora_alpha=4),
    "layers": dict(target_modules=["k_proj", "o_proj", "gate_proj"], layers_to_transform=[1, 3]),
    "bin": dict(target_modules=["v_proj", "down_proj"], _bin=True),
}


@pytest.mark.parametrize("kind", LORAS)
def test_lora_merge_equals_peft_merge_and_unload(dirs, home, tmp_path, kind):
    cfg = dict(LORAS[kind])
    binary = cfg.pop("_bin", False)
    adapter = um.make_lora(dirs["base"], tmp_path / kind, seed=7, safetensors=not binary, **cfg)
    fam = user.register("mine", dirs["base"], {"v": adapter})
    got, want = _engine_state(fam.model_dir("v")), _peft_state(dirs["base"], adapter)
    assert set(want) <= set(got)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6, msg=f"{kind}: {name}")
    base = _engine_state(fam.model_dir("base"))
    changed = {n for n in want if not torch.equal(base[n], got[n])}
    summary = fam.manifest()["sources"]["v"]["lora"]
    assert changed and all(any(f".{p}." in n for p in summary["target_modules"]) for n in changed)
    if "layers_to_transform" in cfg:
        assert summary["layers"] == [1, 3] and all(".layers.1." in n or ".layers.3." in n for n in changed)


@pytest.mark.parametrize("dtype,shard", [(torch.bfloat16, None), (torch.float16, "200KB")])
def test_half_precision_and_sharded_bases(tmp_path, home, dtype, shard):
    base = um.make_base(tmp_path / "base", dtype=dtype, shard=shard)
    if shard:
        assert (base / ck.SAFE_INDEX).is_file() and len(ck.weight_files(base)) > 1
    adapter = um.make_lora(base, tmp_path / "qv", seed=3)
    fam = user.register("half", base, {"qv": adapter})
    want = {k: v.float() for k, v in um.load(base, dtype=dtype).state_dict().items()}
    got = _engine_state(fam.model_dir("base"))
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    assert "qv" in fam.models


def test_each_variant_generates_what_transformers_generates(dirs, home):
    from kvrelay.backends.torch_engine.engine import TorchEngine
    from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams

    fam = user.register("mine", dirs["base"], {"qv": dirs["qv"], "all": dirs["all"], "full": dirs["full"]})
    prompt = [1] + [5 + (7 * i) % 240 for i in range(40)]
    refs = {
        "base": um.load(dirs["base"]),
        "qv": um.merged(dirs["base"], dirs["qv"]),
        "all": um.merged(dirs["base"], dirs["all"]),
        "full": um.load(dirs["full"]),
    }
    for m, ref in refs.items():
        eng = TorchEngine.from_dir(m, fam.model_dir(m), EngineConfig(kv_cache_bytes=16 << 20))
        got = eng.generate([Request("r", prompt, SamplingParams(max_tokens=16, temperature=0.0))])["r"].output_tokens
        want = ref.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert list(got) == want, m


# --- validation: every bad input is refused, naming the file and the field ---------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _nan_weight(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})


def _bad(kind: str, d: dict, tmp: Path) -> tuple[dict, str]:
    """(variants to register over the real base, the message expected) for each bad input."""
    base = d["base"]
    if kind == "layers":
        return {
            "v": um.make_base(tmp / "v", num_hidden_layers=3)
        }, r"config.json: field num_hidden_layers \(layers\) is 3"
    if kind == "heads":
        return {"v": um.make_base(tmp / "v", num_key_value_heads=4)}, r"field num_key_value_heads \(KV heads\) is 4"
    if kind == "rope":
        return {"v": um.make_base(tmp / "v", rope_theta=500000.0)}, r"field rope_theta / rope_scaling \(RoPE\)"
    if kind == "tokenizer":
        v = _copy(d["full"], tmp / "v")
        t = json.loads((v / "tokenizer.json").read_text())
        t["model"]["vocab"] = {w: (i + 1) % len(um.VOCAB) for w, i in t["model"]["vocab"].items()}
        (v / "tokenizer.json").write_text(json.dumps(t))
        return {"v": v}, r"tokenizer.json: field 'model' differs from the base's"
    if kind == "adapter-base":
        v = _copy(d["qv"], tmp / "v")
        um.edit_json(v / ck.ADAPTER_CONFIG, base_model_name_or_path="meta-llama/Llama-3.1-8B")
        return {"v": v}, r"adapter_config.json: field 'base_model_name_or_path' is 'meta-llama/Llama-3.1-8B'"
    if kind == "adapter-shapes":
        other = um.make_base(tmp / "wide", intermediate_size=96)
        v = um.make_lora(other, tmp / "v", target_modules=["up_proj"])
        um.edit_json(v / ck.ADAPTER_CONFIG, base_model_name_or_path=str(base))
        return {"v": v}, r"lora_B.weight has shape \[96, 4\]; the base's up_proj has 128 outputs"
    if kind == "dora":
        return {"v": um.make_lora(base, tmp / "v", use_dora=True)}, r"field 'use_dora': DoRA"
    if kind == "modules-to-save":
        return (
            {"v": um.make_lora(base, tmp / "v", modules_to_save=["lm_head"])},
            r"field 'modules_to_save': a full copy of \['lm_head'\]",
        )
    if kind == "not-lora":
        v = _copy(d["qv"], tmp / "v")
        um.edit_json(v / ck.ADAPTER_CONFIG, peft_type="IA3")
        return {"v": v}, r"field 'peft_type' is 'IA3'; only LORA adapters are supported"
    if kind == "architecture":
        v = _copy(d["full"], tmp / "v")
        um.edit_json(v / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
        return {"v": v}, r"GPT2LMHeadModel.*supported"
    if kind == "missing":
        v = _copy(d["full"], tmp / "v")
        (v / "model.safetensors").unlink()
        return {"v": v}, r"no weights: expected model.safetensors"
    if kind == "truncated":
        v = _copy(d["full"], tmp / "v")
        _truncate(v / "model.safetensors", 100_000)
        return {"v": v}, r"model.safetensors: truncated"
    if kind == "truncated-adapter":
        v = _copy(d["qv"], tmp / "v")
        _truncate(v / "adapter_model.safetensors", 2000)
        return {"v": v}, r"adapter_model.safetensors: truncated"
    if kind == "nan":
        v = _copy(d["full"], tmp / "v")
        _nan_weight(v)
        return {"v": v}, r"tensor model.layers.2.mlp.up_proj.weight holds non-finite values"
    if kind == "neither":
        (tmp / "v").mkdir()
        (tmp / "v" / "notes.txt").write_text("hello")
        return {"v": tmp / "v"}, r"neither a HF checkpoint .* nor a PEFT LoRA adapter"
    raise AssertionError(kind)


BAD = [
    "layers",
    "heads",
    "rope",
    "tokenizer",
    "adapter-base",
    "adapter-shapes",
    "dora",
    "modules-to-save",
    "not-lora",
    "architecture",
    "missing",
    "truncated",
    "truncated-adapter",
    "nan",
    "neither",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_inputs_are_refused_and_nothing_is_registered(dirs, home, tmp_path, kind):
    variants, message = _bad(kind, dirs, tmp_path)
    with pytest.raises(KvRelayError, match=message):
        user.register("mine", dirs["base"], variants)
    _nothing_left(home, "mine")


def test_the_cli_exits_2_naming_the_file(dirs, home, tmp_path):
    variants, _ = _bad("dora", dirs, tmp_path)
    r = kvrelay("models", "add", "mine", "--base", dirs["base"], "--variant", f"v={variants['v']}", env_home=home)
    assert r.returncode == 2 and r.stderr.startswith("kvrelay: error: ") and "adapter_config.json" in r.stderr
    assert "Traceback" not in r.stderr
    for argv, msg in (
        (["--variant", "novalue"], "expected VNAME=DIR"),
        (["--variant", f"base={dirs['qv']}"], "not 'base'"),
        (["--variant", f"x={tmp_path / 'none'}"], "variant 'x' directory not found"),
    ):
        r = kvrelay("models", "add", "mine", "--base", dirs["base"], *argv, env_home=home)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = kvrelay("models", "add", "smol", "--base", dirs["base"], env_home=home)
    assert r.returncode == 2 and "taken by a family kvrelay provides" in r.stderr
    _nothing_left(home, "mine")


# --- a file changed after registration ---------------------------------------------------------------


def test_a_changed_file_is_reported_and_refused(dirs, home, tmp_path):
    qv = _copy(dirs["qv"], tmp_path / "qv")
    user.register("mine", dirs["base"], {"qv": qv})
    weights = qv / "adapter_model.safetensors"
    os.utime(weights)  # touched, same content: still served
    assert list(registry.load_family("mine").models) == ["base", "qv"]

    from safetensors.torch import load_file, save_file

    sd = load_file(str(weights))
    k = next(iter(sd))
    sd[k] = sd[k] * 2
    save_file(sd, str(weights), metadata={"format": "pt"})
    with pytest.raises(FamilyChanged, match=r"adapter_model.safetensors \(model 'qv'\) is changed"):
        registry.load_family("mine")
    listing = kvrelay("models", "list", env_home=home)
    assert listing.returncode == 0 and "changed" in listing.stdout and str(weights) in listing.stdout
    serve = kvrelay("serve", "--family", "mine", env_home=home, timeout=120)
    assert serve.returncode == 2 and "is changed" in serve.stderr and "Register it again" in serve.stderr
    weights.unlink()
    with pytest.raises(FamilyChanged, match="is missing"):
        registry.load_family("mine")
