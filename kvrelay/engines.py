"""Engines for a family's models, whatever the family's kind (built on disk, or synthetic)."""
from __future__ import annotations

from kvrelay import synthetic
from kvrelay.errors import KvRelayError


def family_models(family: str) -> list[str]:
    """Model names of a family, base first."""
    if synthetic.is_synthetic(family):
        return list(synthetic.spec(family)[1])
    from kvrelay.families import load_family
    return list(load_family(family).models)


def make_engine(family: str, model: str, config=None, **synthetic_overrides):
    """A TorchEngine for `model` of `family` (config: an EngineConfig)."""
    from kvrelay.backends.torch_engine.engine import TorchEngine
    if synthetic.is_synthetic(family):
        hf, seeds = synthetic.spec(family, **synthetic_overrides)
        if model not in seeds:
            raise KvRelayError(f"family {family!r} has models {list(seeds)}, not {model!r}")
        return TorchEngine.random(model, hf, seeds[model], config, tokenizer_id=family)
    from kvrelay.families import load_family
    return TorchEngine.from_dir(model, load_family(family).model_dir(model), config)
