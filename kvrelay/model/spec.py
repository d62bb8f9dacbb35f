"""One identity per model: what the engine, the deployment, the page store's keys, the profiler and
the load tests all read, computed in one place.

    fam = kvrelay.families.family_spec("smol")   # built on disk, or synthetic (real shapes, random weights)
    spec = fam.model("code")
    spec.model_id                        # "code@<weights digest>": keys pages to these exact weights
    spec.fingerprint                     # architecture + tokenizer: who may share KV with whom
    spec.page_format(16, "float32")      # the KV page layout of this model

If two of these were computed apart and drifted, store keys would stop matching without an error.
The identity lives here; finding a family's models by name (on disk or synthetic) is the families
layer's (kvrelay.families.family_spec). No torch import here (page_format imports the page layout,
which needs torch, when called).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvrelay.errors import KvRelayError
from kvrelay.model import fingerprint as fp
from kvrelay.model import synthetic

if TYPE_CHECKING:
    from kvrelay.model.kv_format import PageFormat

DEFAULT_MAX_LEN = 4096  # for configs that do not say (max_position_embeddings)


def read_hf_config(model_dir: str | Path) -> dict:
    """A Hugging Face model directory's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise KvRelayError(f"no config.json in {model_dir}: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise KvRelayError(f"{path} is not valid JSON: {e}") from None


def kv_shape(cfg: dict) -> tuple[int, int, int, int]:
    """(layers, KV heads, head dim, hidden size) of an HF config (grouped-query attention included)."""
    heads = cfg["num_attention_heads"]
    return (
        cfg["num_hidden_layers"],
        cfg.get("num_key_value_heads") or heads,
        cfg.get("head_dim") or cfg["hidden_size"] // heads,
        cfg["hidden_size"],
    )


def adapter_weights(base_weights: str, adapter_file: Path) -> str:
    """The weights id of an adapter file served over weights `base_weights` (one formula for the
    engine and the serving core: pages are keyed by it)."""
    return f"{base_weights}+lora-{fp.sha256_file(adapter_file)[:12]}"


@dataclass(frozen=True)
class ModelSpec:
    family: str
    name: str
    hf_config: dict = field(compare=False, repr=False)
    fingerprint: str
    weights: str  # digest of the weight files, or random-<family>-seed<n>
    model_dir: Path | None = None  # None: synthetic, weights drawn at load time from `seed`
    seed: int | None = None

    @classmethod
    def from_dir(cls, name: str, model_dir: str | Path, family: str = "") -> "ModelSpec":
        model_dir = Path(model_dir)
        cfg = read_hf_config(model_dir)
        return cls(
            family, name, cfg, fp.compute(cfg, model_dir / "tokenizer.json"), fp.weights_digest(model_dir), model_dir
        )

    @classmethod
    def random(cls, family: str, name: str, hf_config: dict, seed: int) -> "ModelSpec":
        # no tokenizer: token ids are the interface, and the family's name stands for its vocabulary
        return cls(
            family,
            name,
            hf_config,
            fp.compute(hf_config, None) + "-" + family,
            f"random-{family}-seed{seed}",
            None,
            seed,
        )

    def adapter_over(self, name: str, adapter_file: Path) -> "ModelSpec":
        """A PEFT adapter served over this model without being registered in its family (added to a
        running server): its weights are this model's plus the adapter file's digest."""
        return ModelSpec(
            self.family, name, self.hf_config, self.fingerprint, adapter_weights(self.weights, adapter_file)
        )

    @property
    def synthetic(self) -> bool:
        return self.model_dir is None

    @property
    def model_id(self) -> str:
        """These exact weights: part of a page's key in the store."""
        return f"{self.name}@{self.weights}"

    @property
    def num_layers(self) -> int:
        return kv_shape(self.hf_config)[0]

    @property
    def vocab_size(self) -> int:
        return self.hf_config["vocab_size"]

    @property
    def max_position_embeddings(self) -> int:
        return int(self.hf_config.get("max_position_embeddings", DEFAULT_MAX_LEN))

    def page_format(self, block_size: int, dtype: str, e_layers: tuple[int, ...] | None = None) -> PageFormat:
        from kvrelay.model.kv_format import PageFormat  # torch: lazy, the identity is read without it

        return PageFormat.for_model(*kv_shape(self.hf_config), block_size, dtype, e_layers)


MANIFEST = "family.json"  # a family directory's record (kvrelay.families.registry writes it)


@dataclass(frozen=True)
class FamilySpec:
    """A model family, the one type for it: built by kvrelay, registered from a user's directories
    (both on disk under `root`, read by kvrelay.families.load_family) or synthetic (root None: real
    shapes, random weights drawn at load time)."""

    name: str
    models: tuple[str, ...]  # base first
    root: Path | None = None  # the family's directory; None: synthetic
    fingerprint: str = ""  # every model's (all equal); synthetic: per model, read it from model()
    dirs: dict[str, Path] = field(compare=False, repr=False, default_factory=dict)  # on disk: model -> dir
    _specs: dict = field(compare=False, repr=False, default_factory=dict)

    @property
    def synthetic(self) -> bool:
        return self.root is None

    @property
    def base(self) -> str:
        return self.models[0]

    @property
    def variants(self) -> list[str]:
        return list(self.models[1:])

    def model_dir(self, name: str) -> Path:
        """The Hugging Face model directory of model `name` (a family on disk)."""
        if self.synthetic:
            raise KvRelayError(f"family {self.name!r} is synthetic: its models have no directory")
        try:
            return self.dirs[name]
        except KeyError:
            raise KvRelayError(
                f"family {self.name!r} has no model {name!r}; its models: {', '.join(self.models)}"
            ) from None

    def manifest(self) -> dict:
        """The parsed family.json (build or registration info, weights digests)."""
        if self.synthetic:
            raise KvRelayError(f"family {self.name!r} is synthetic: it has no family.json")
        return json.loads((self.root / MANIFEST).read_text())

    def model(self, name: str, **synthetic_overrides) -> ModelSpec:
        """overrides (synthetic families only) shrink shapes for tests on small machines."""
        if name not in self.models:
            raise KvRelayError(f"family {self.name!r} has models {list(self.models)}, not {name!r}")
        if synthetic_overrides:
            if not self.synthetic:
                raise KvRelayError(f"family {self.name!r} is built on disk: its shapes cannot be overridden")
            return self._random(name, synthetic_overrides)
        if name not in self._specs:
            self._specs[name] = (
                self._random(name, {}) if self.synthetic else ModelSpec.from_dir(name, self.dirs[name], self.name)
            )
        return self._specs[name]

    def _random(self, name: str, overrides: dict) -> ModelSpec:
        hf, seeds = synthetic.spec(self.name, **overrides)
        return ModelSpec.random(self.name, name, hf, seeds[name])

    def tokenizer_dir(self) -> Path | None:
        """Where the family's (shared) tokenizer is; None for synthetic families (token ids as text)."""
        return None if self.synthetic else self.dirs[self.base]
