"""Families from the user's own directories: `kvrelay models add NAME --base DIR --variant VNAME=DIR`
or a deployment's [family] table.

Each variant DIR is a full Hugging Face checkpoint of the base's architecture or a PEFT LoRA adapter
over the base. Everything is validated before anything is registered (kvrelay.model.checkpoint: files,
truncation, shapes, dtypes, finite values, adapter settings; architecture and tokenizer against the
base), and every error names the file and the field. Nothing is copied: the family directory holds,
per model, a directory of symlinks that is a complete HF model dir (a LoRA variant's: the base's
config, tokenizer and weights beside the adapter's files, merged when an engine loads it) and a
family.json recording each file's size, mtime and sha256, so a file changed afterwards is noticed
(kvrelay.families.registry.verify_files, when the family is loaded) rather than served under stale
digests and profiles.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.errors import FamilyChanged, KvRelayError
from kvrelay.families import registry
from kvrelay.model import checkpoint as ck
from kvrelay.model import fingerprint as fp
from kvrelay.model import synthetic
from kvrelay.model.architectures import check_supported
from kvrelay.model.spec import ModelSpec

BASE = "base"
FORMAT = 1
# files of a model dir that are neither config nor weights: the family's tokenizer and generation defaults
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
GENERATION = "generation_config.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ARCH_LABELS = {
    "model_type": "model_type",
    "num_hidden_layers": "num_hidden_layers (layers)",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads (heads)",
    "num_key_value_heads": "num_key_value_heads (KV heads)",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "rope": "rope_theta / rope_scaling (RoPE)",
}


@dataclass
class Source:
    """One model as registered: its kind, the user's directory, and its view's files (link -> target)."""

    name: str
    kind: str  # base | full | lora
    dir: Path
    links: dict[str, Path] = field(default_factory=dict)
    lora: dict | None = None
    nbytes: int = 0


# --- validation --------------------------------------------------------------------------------


def _dir(d, what: str) -> Path:
    p = Path(d).expanduser()
    if not p.is_dir():
        raise ck.CheckpointError(f"{p}: {what} directory not found")
    return p.resolve()


def _config(d: Path) -> dict:
    path = d / "config.json"
    cfg = ck.read_json(path, "a Hugging Face model directory has config.json")
    check_supported(cfg, str(path))
    for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(k), int) or cfg[k] <= 0:
            raise ck.CheckpointError(f"{path}: field {k!r} missing or not a positive integer")
    return cfg


def _checkpoint(d: Path, cfg: dict) -> tuple[dict[str, Path], int]:
    """(view links for the weights, bytes); validates files, shapes, dtypes and finiteness."""
    tensors = ck.tensor_index(d)
    ck.check_tensors(d, cfg, tensors)
    ck.check_finite(tensors)
    files = ck.weight_files(d)
    links = {f.name: f for f in files}
    for index in (ck.SAFE_INDEX, ck.BIN_INDEX):
        if (d / index).exists():
            links[index] = d / index
    return links, sum(f.stat().st_size for f in files)


def _tokenizer_links(d: Path) -> dict[str, Path]:
    return {f: d / f for f in TOKENIZER_FILES if (d / f).is_file()}


def _same_architecture(base_dir: Path, base_cfg: dict, d: Path, cfg: dict) -> None:
    a, b = fp.architecture(base_cfg), fp.architecture(cfg)
    for k, label in ARCH_LABELS.items():
        if a.get(k) != b.get(k):
            raise ck.CheckpointError(
                f"{d / 'config.json'}: field {label} is {b.get(k)!r}, the base's "
                f"({base_dir / 'config.json'}) is {a.get(k)!r}: a variant must have the base's "
                "architecture to share its KV cache"
            )


def _same_tokenizer(base_dir: Path, d: Path) -> None:
    if not (d / "tokenizer.json").is_file():
        return  # the family's tokenizer is the base's
    try:
        a = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
        b = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ck.CheckpointError(f"{d / 'tokenizer.json'}: not valid JSON ({e})") from None
    for section in fp.TOKENIZER_SECTIONS:
        if a.get(section) != b.get(section):
            raise ck.CheckpointError(
                f"{d / 'tokenizer.json'}: field {section!r} differs from the base's "
                f"({base_dir / 'tokenizer.json'}): the models must share one tokenizer (token "
                "ids mean the same to every variant)"
            )


def _adapter_fits_base(adapter_dir: Path, cfg_value, base_dir: Path) -> None:
    """base_model_name_or_path names the base: the same directory, one with the same config and
    weights, or (a hub id or moved path) a name ending in the base directory's name."""
    if not cfg_value:
        return
    path = adapter_dir / ck.ADAPTER_CONFIG
    named = Path(str(cfg_value)).expanduser()
    if named.is_dir():
        if named.resolve() == base_dir:
            return
        try:
            if fp.weights_digest(named) == fp.weights_digest(base_dir) and fp.architecture(
                ck.read_json(named / "config.json")
            ) == fp.architecture(ck.read_json(base_dir / "config.json")):
                return
        except KvRelayError:
            pass
        raise ck.CheckpointError(
            f"{path}: field 'base_model_name_or_path' is {str(cfg_value)!r}, a directory whose "
            f"weights are not the base's ({base_dir}): the adapter was trained on another model"
        )
    if str(cfg_value).rstrip("/").rsplit("/", 1)[-1] == base_dir.name:
        return
    raise ck.CheckpointError(
        f"{path}: field 'base_model_name_or_path' is {str(cfg_value)!r}, not the base "
        f"{base_dir} (neither that directory nor a name ending in {base_dir.name!r}); if the "
        "adapter was trained on this base, set the field to the base directory"
    )


def validate(name: str, base: str | Path, variants: dict[str, str | Path]) -> list[Source]:
    """Every model of the family checked; [base Source, variant Sources...] with their view links."""
    if not _NAME.match(name):
        raise KvRelayError(
            f"family name {name!r}: use letters, digits, '-' and '_' (at most 64, first a letter or digit)"
        )
    if name in registry.FAMILY_NAMES or synthetic.is_synthetic(name):
        raise KvRelayError(f"family name {name!r} is taken by a family kvrelay provides; choose another")
    for v in variants:
        if not _NAME.match(v) or v == BASE:
            raise KvRelayError(
                f"variant name {v!r}: use letters, digits, '-' and '_', and not {BASE!r} (the base's name)"
            )
    base_dir = _dir(base, "base model")
    base_cfg = _config(base_dir)
    if not (base_dir / "tokenizer.json").is_file():
        raise ck.CheckpointError(f"{base_dir / 'tokenizer.json'}: missing (the base's fast tokenizer is the family's)")
    tok = _tokenizer_links(base_dir)
    weights, nbytes = _checkpoint(base_dir, base_cfg)
    gen = {GENERATION: base_dir / GENERATION} if (base_dir / GENERATION).is_file() else {}
    out = [
        Source(
            BASE, "base", base_dir, {"config.json": base_dir / "config.json", **tok, **gen, **weights}, nbytes=nbytes
        )
    ]
    for v, d in variants.items():
        vdir = _dir(d, f"variant {v!r}")
        if ck.is_adapter(vdir):
            adapter = ck.read_adapter(vdir, base_cfg)
            _adapter_fits_base(vdir, adapter.config.get("base_model_name_or_path"), base_dir)
            ck.check_finite(ck.file_tensors(adapter.weights))
            links = {
                "config.json": base_dir / "config.json",
                **tok,
                **gen,
                **weights,
                ck.ADAPTER_CONFIG: vdir / ck.ADAPTER_CONFIG,
                adapter.weights.name: adapter.weights,
            }
            out.append(Source(v, "lora", vdir, links, adapter.summary(), adapter.weights.stat().st_size))
        else:
            if not (vdir / "config.json").exists() and not any(vdir.glob("*.safetensors")):
                raise ck.CheckpointError(
                    f"{vdir}: variant {v!r} is neither a HF checkpoint (config.json + weights) "
                    f"nor a PEFT LoRA adapter ({ck.ADAPTER_CONFIG} + {ck.ADAPTER_WEIGHTS[0]})"
                )
            cfg = _config(vdir)
            _same_architecture(base_dir, base_cfg, vdir, cfg)
            _same_tokenizer(base_dir, vdir)
            w, n = _checkpoint(vdir, cfg)
            vgen = {GENERATION: vdir / GENERATION} if (vdir / GENERATION).is_file() else gen
            out.append(Source(v, "full", vdir, {"config.json": vdir / "config.json", **tok, **vgen, **w}, nbytes=n))
    return out


# --- registration ------------------------------------------------------------------------------


def _record(path: Path, shas: dict) -> dict:
    st = path.stat()
    if path not in shas:
        shas[path] = fp.sha256_file(path)
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": shas[path]}


def definition(sources: list[Source]) -> dict:
    return {s.name: {"kind": s.kind, "dir": str(s.dir)} for s in sources}


def register(name: str, base: str | Path, variants: dict[str, str | Path], replace: bool = False):
    """Validate, then register family `name` atomically (under its lock); returns the FamilySpec."""
    sources = validate(name, base, variants)
    if registry.family_dir(name).exists() and not replace:
        where = registry.family_dir(name)
        raise KvRelayError(
            f"family {name!r} is already registered ({where}); `kvrelay models remove {name}` first, or add --replace"
        )

    def fill(tmp: Path) -> dict:
        shas: dict[Path, str] = {}
        files, specs = {}, {}
        for s in sources:
            view = tmp / s.name
            view.mkdir()
            for link, target in s.links.items():
                os.symlink(target, view / link)
            files[s.name] = {link: _record(target, shas) for link, target in s.links.items()}
            specs[s.name] = ModelSpec.from_dir(s.name, view, name)  # writes the view's weights digest cache
        fps = {m: sp.fingerprint for m, sp in specs.items()}
        if len(set(fps.values())) != 1:
            raise KvRelayError(f"family {name!r}: models do not share one fingerprint: {fps}")
        return {
            "format": FORMAT,
            "name": name,
            "kind": "registered",
            "base": BASE,
            "models": [s.name for s in sources],
            "fingerprint": fps[BASE],
            "weights": {m: sp.weights for m, sp in specs.items()},
            "sources": {
                s.name: {"kind": s.kind, "dir": str(s.dir), "bytes": s.nbytes, **({"lora": s.lora} if s.lora else {})}
                for s in sources
            },
            "files": files,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "kvrelay_version": registry._version(),
            "python": sys.version.split()[0],
        }

    with registry.family_lock(name):
        if registry.family_dir(name).exists() and not replace:
            raise KvRelayError(f"family {name!r} was registered meanwhile by another command")
        registry._swap_in(name, fill)
    return registry.load_family(name)


def ensure_registered(name: str, base: str | Path, variants: dict[str, str | Path]):
    """A deployment's [family]: the registered family if it is this definition and unchanged, else
    registered (again) from it."""
    if registry.is_registered(name):
        try:
            fam = registry.load_family(name)
            want = {
                BASE: {"kind": None, "dir": str(_dir(base, "base model"))},
                **{v: {"kind": None, "dir": str(_dir(d, f"variant {v!r}"))} for v, d in variants.items()},
            }
            have = fam.manifest()["sources"]
            if list(have) == list(want) and all(have[m]["dir"] == want[m]["dir"] for m in want):
                return fam
        except FamilyChanged:
            pass
    return register(name, base, variants, replace=True)


# --- listing ------------------------------------------------------------------------------------


def describe(manifest: dict, model: str) -> str:
    """`kind` of one model for `models list`: base, full, or LoRA r/alpha/targets."""
    s = manifest.get("sources", {}).get(model, {})
    kind = s.get("kind", "?")
    if kind == "lora":
        lo = s.get("lora", {})
        extra = []
        if lo.get("use_rslora"):
            extra.append("rslora")
        if lo.get("rank_pattern"):
            extra.append(f"rank_pattern {lo['rank_pattern']}")
        if lo.get("alpha_pattern"):
            extra.append(f"alpha_pattern {lo['alpha_pattern']}")
        if lo.get("layers_to_transform") is not None:
            extra.append(f"layers {lo['layers_to_transform']}")
        return (
            f"LoRA r={lo.get('r')} alpha={lo.get('lora_alpha')} on {','.join(lo.get('target_modules', []))}"
            + (f" ({'; '.join(extra)})" if extra else "")
            + ' (merged at load, or unmerged on the base\'s engine with lora = "unmerged")'
        )
    return {"base": "base", "full": "full checkpoint"}.get(kind, kind)
