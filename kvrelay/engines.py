"""The engine factory: an engine for a family's model, whatever the family's kind (built on disk,
registered, or synthetic).

    make_engine("tiny", "code", EngineConfig(kv_cache_bytes=8 << 20))

It sits above the layers it joins: kvrelay.families finds the model's identity (a
kvrelay.model.spec.ModelSpec) and kvrelay.backends implements the engine interface
(kvrelay.model.engine_api) for it, so neither the model layer nor the backend knows about families.
Importing this module imports the torch backend (torch).
"""

from __future__ import annotations

from kvrelay.backends.torch_engine.engine import TorchEngine
from kvrelay.families import family_spec


def make_engine(family: str, model: str, config=None, adapters=(), **synthetic_overrides) -> TorchEngine:
    """A TorchEngine for `model` of `family` (config: an EngineConfig); `adapters`: LoRA variants of
    the family it also serves, unmerged, under their names."""
    fam = family_spec(family)
    spec = fam.model(model, **synthetic_overrides)
    if adapters:
        return TorchEngine.with_adapters(spec, [fam.model(a) for a in adapters], config)
    return TorchEngine.from_spec(spec, config)
