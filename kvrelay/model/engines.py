"""Engines for a family's models, whatever the family's kind (built on disk, or synthetic)."""
from __future__ import annotations

from kvrelay.families import family_spec


def family_models(family: str) -> list[str]:
    """Model names of a family, base first."""
    return list(family_spec(family).models)


def make_engine(family: str, model: str, config=None, **synthetic_overrides):
    """A TorchEngine for `model` of `family` (config: an EngineConfig)."""
    from kvrelay.backends.torch_engine.engine import TorchEngine
    return TorchEngine.from_spec(family_spec(family).model(model, **synthetic_overrides), config)
