"""Engines for a family's models, whatever the family's kind (built on disk, or synthetic)."""
from __future__ import annotations

from kvrelay.model.spec import family_spec


def family_models(family: str) -> list[str]:
    """Model names of a family, base first."""
    return list(family_spec(family).models)


def make_engine(family: str, model: str, config=None, adapters=(), **synthetic_overrides):
    """A TorchEngine for `model` of `family` (config: an EngineConfig); `adapters`: LoRA variants of
    the family it also serves, unmerged, under their names."""
    from kvrelay.backends.torch_engine.engine import TorchEngine
    fam = family_spec(family)
    spec = fam.model(model, **synthetic_overrides)
    if adapters:
        return TorchEngine.with_adapters(spec, [fam.model(a) for a in adapters], config)
    return TorchEngine.from_spec(spec, config)
