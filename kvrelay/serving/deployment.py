"""A deployment: which family, which variants on which devices, which page store and profiles.

Read from a TOML file (deploy/*.toml) or made from defaults for a family; the Triton model
repository is generated from it, and every Triton model reads the resolved JSON copy at start-up.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.families import family_spec, user
from kvrelay.model import checkpoint as ck
from kvrelay.model.kv_format import DTYPES, PageFormat
from kvrelay.model.spec import ModelSpec
from kvrelay.units import parse_bytes


@dataclass(slots=True)
class ModelDeployment:
    name: str
    device: str = "cpu"
    dtype: str = "float32"
    instances: int = 1
    kv_cache_bytes: int = 512 << 20
    threads: int = 0  # CPU intra-op threads per instance; 0 = share the cores (cpu_threads)


@dataclass(slots=True)
class Deployment:
    family: str
    models: list[ModelDeployment]
    store: str = "memory:1GiB"
    profiles_dir: str = ""  # "" = the checkout's profiles/
    block_size: int = 16
    quality_target: float = 0.01  # selector, exact-agreement profiles: within 1% of the receiver's own
    quality_mode: str = "target"  # selector, teacher-forced profiles: "target" (kvrelay.profiler.target:
    # retained gain >= 95%, top-1 >= 97%) or "strict" (top-1 >= 99%)
    e_layers: str = "even"  # where engines keep E for donors: "even" (every 2nd layer: plain plans'
    # group starts; 1.5x KV per kept layer) or "all" (K/V-corrected plans
    # too; pages ~2.5x the size of KV alone on SmolLM2's shapes)
    slo_s: float | None = None  # per-request prefill SLO for the selector's idle rule
    max_tokens_limit: int = 1024  # largest max_tokens a request may ask
    max_input_chars: int = 200_000  # refuse absurd text before tokenizing it
    orchestrator_instances: int = 1
    sharing: bool = True  # False: every variant prefills itself (the no-sharing baseline)
    coalesce: bool = True  # wait for an in-flight prefill of the same context (routing.InFlightPrefills)
    publish: bool = True  # False: read the page store, never write to it (a read-only replica)
    prefix_caching: bool = True  # False: engines keep no prefix cache (vLLM --no-enable-prefix-caching)
    variant_entry_points: bool = True  # each variant also served under its own Triton model name
    shared_prefix_cache: bool = False  # True: a tenant's prefix-cache hits may come from another tenant's blocks
    # (faster repeats across tenants, but B can time what A sent)
    lora: str = "merged"  # LoRA variants: "merged" (each its own engine, adapter merged: a full copy
    # of the weights each) or "unmerged" (adapters on the base's engine, one
    # decode batch across variants, one copy of the weights, every core on it)
    max_loras: int = 8  # lora = "unmerged": adapters resident at once (LRU, the rest on disk)
    extra: dict = field(default_factory=dict)

    def model(self, name: str) -> ModelDeployment:
        for m in self.models:
            if m.name == name:
                return m
        raise KvRelayError(f"unknown model {name!r}; this deployment serves {self.model_names}")

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def cpu_threads(self, name: str, cpus: int | None = None, engines: int | None = None) -> int:
        """Intra-op threads for one CPU instance of `name`: its own setting, else the machine's cores
        split over every CPU engine instance. Each engine is its own process; if each took every core,
        concurrent prefills would oversubscribe them (measured: 4 engines x 2 threads on 2 cores ran
        8 concurrent 3k-token prefills in 80 s, 1 thread each in 55 s). `engines`: how many CPU engines
        there are when that is not one per model (lora = "unmerged": variants share the base's)."""
        m = self.model(name)
        if m.threads:
            return m.threads
        if engines is None:
            engines = sum(x.instances for x in self.models if x.device == "cpu")
        return max(1, (cpus or os.cpu_count() or 1) // max(1, engines))

    def e_layer_list(self, num_layers: int) -> tuple[int, ...]:
        """The layers whose entering hidden state (E) engines keep and donors' pages carry."""
        return tuple(range(1, num_layers)) if self.e_layers == "all" else tuple(range(2, num_layers, 2))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Deployment":
        d = json.loads(text)
        d["models"] = [ModelDeployment(**m) for m in d["models"]]
        return cls(**d)


def for_family(family: str, **overrides) -> Deployment:
    """Every model of the family on the CPU with default settings."""
    return Deployment(family=family, models=[ModelDeployment(m) for m in family_spec(family).models], **overrides)


def load(path: str | Path) -> Deployment:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KvRelayError(f"deployment file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise KvRelayError(f"{path}: not valid TOML: {e}") from None
    if "family" not in raw:
        raise KvRelayError(f"{path}: 'family' is required")
    if isinstance(raw["family"], dict):
        raw["family"] = _register_family(path, raw["family"])
    elif not isinstance(raw["family"], str):
        raise KvRelayError(f"{path}: 'family' must be a family's name or a [family] table (name, base, variants)")
    defaults = raw.pop("defaults", {})
    models_raw = raw.pop("models", None)
    known = list(family_spec(raw["family"]).models)
    names = list(models_raw) if models_raw else known
    models = []
    for n in names:
        if n not in known:
            raise KvRelayError(f"{path}: family {raw['family']!r} has no model {n!r} (it has {known})")
        spec = {**defaults, **((models_raw or {}).get(n) or {})}
        if "kv_cache_bytes" in spec:
            spec["kv_cache_bytes"] = parse_bytes(spec["kv_cache_bytes"])
        try:
            models.append(ModelDeployment(n, **spec))
        except TypeError as e:
            raise KvRelayError(f"{path}: [models.{n}]: {e}") from None
    try:
        dep = Deployment(models=models, **raw)
    except TypeError as e:
        raise KvRelayError(f"{path}: {e}") from None
    validate(dep)
    return dep


def _register_family(path: Path, table: dict) -> str:
    """A [family] table: name = "...", base = "DIR", [family.variants] VNAME = "DIR" (paths relative to
    the deployment file). Registered (kvrelay.families.user) unless it already is, unchanged."""
    unknown = sorted(set(table) - {"name", "base", "variants"})
    if unknown:
        raise KvRelayError(f"{path}: [family]: unknown field(s) {unknown}; it takes name, base and variants")
    name, base, variants = table.get("name"), table.get("base"), table.get("variants") or {}
    if not isinstance(name, str) or not name:
        raise KvRelayError(f"{path}: [family]: field 'name' is required (the name the family is registered under)")
    if not isinstance(base, str) or not base:
        raise KvRelayError(f"{path}: [family]: field 'base' is required (the base model's directory)")
    if not isinstance(variants, dict):
        raise KvRelayError(f"{path}: [family]: field 'variants' must be a table of VNAME = \"DIR\"")
    for v, d in variants.items():
        if not isinstance(d, str):
            raise KvRelayError(
                f"{path}: [family.variants]: {v} = {d!r} is not a directory; each entry is "
                'VNAME = "DIR" (in TOML, the deployment\'s own keys go before its first [table])'
            )
    here = path.resolve().parent
    resolve = lambda d: str((here / Path(d).expanduser()).resolve())
    user.ensure_registered(name, resolve(base), {v: resolve(d) for v, d in variants.items()})
    return name


def validate(dep: Deployment) -> Deployment:
    if not dep.models:
        raise KvRelayError("a deployment needs at least one model")
    for m in dep.models:
        if m.instances < 1:
            raise KvRelayError(f"model {m.name}: instances must be >= 1")
        if m.threads < 0:
            raise KvRelayError(f"model {m.name}: threads must be >= 0 (0 = split the cores between engines)")
        if m.dtype not in DTYPES:
            raise KvRelayError(f"model {m.name}: dtype must be one of {', '.join(DTYPES)}")
    if dep.quality_mode not in ("target", "strict"):
        raise KvRelayError(f"quality_mode must be 'target' or 'strict', got {dep.quality_mode!r}")
    if dep.e_layers not in ("even", "all"):
        raise KvRelayError(f"e_layers must be 'even' or 'all', got {dep.e_layers!r}")
    if dep.lora not in ("merged", "unmerged"):
        raise KvRelayError(f"lora must be 'merged' or 'unmerged', got {dep.lora!r}")
    if not isinstance(dep.max_loras, int) or dep.max_loras < 1:
        raise KvRelayError(f"max_loras must be an integer >= 1, got {dep.max_loras!r}")
    if dep.block_size < 1 or dep.block_size & (dep.block_size - 1):
        raise KvRelayError("block_size must be a power of two")
    return dep


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model as this deployment serves it: its identity (ModelSpec, the one identity type) and the
    KV page format the deployment gives it (block size, dtype, E layers)."""

    spec: ModelSpec
    page_format: PageFormat

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    @property
    def weights(self) -> str:
        return self.spec.weights

    @property
    def max_model_len(self) -> int:
        return self.spec.max_position_embeddings

    @property
    def num_layers(self) -> int:
        return self.page_format.num_layers


def identities(dep: Deployment) -> dict[str, ServedModel]:
    fam = family_spec(dep.family)
    out = {}
    for m in dep.models:
        spec = fam.model(m.name)
        out[m.name] = ServedModel(spec, spec.page_format(dep.block_size, m.dtype, dep.e_layer_list(spec.num_layers)))
    return out


def engine_groups(dep: Deployment) -> dict[str, list[str]]:
    """Which engine serves which models: engine (named after the model whose weights it loads) ->
    the deployment's models it serves. One per model, except with lora = "unmerged", where the
    family's base serves itself (if deployed) and every LoRA variant as an adapter; full fine-tunes
    keep engines of their own. Members of a group must agree on device and dtype."""
    if dep.lora == "merged":
        return {m.name: [m.name] for m in dep.models}
    fam = family_spec(dep.family)
    groups: dict[str, list[str]] = {}
    for m in dep.models:
        lora = not fam.synthetic and m.name != fam.base and ck.adapter_dir(fam.dirs[m.name]) is not None
        groups.setdefault(fam.base if lora else m.name, []).append(m.name)
    for engine, members in groups.items():
        settings = {(dep.model(n).device, dep.model(n).dtype) for n in members}
        if len(settings) > 1:
            raise KvRelayError(
                f'lora = "unmerged": {members} share the {engine!r} engine but ask for different '
                f"devices or dtypes {sorted(settings)}; give them the same"
            )
    return groups
