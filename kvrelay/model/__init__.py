"""A model and its KV: identity (spec), page format, recompute plans and the profile files that rate
them, fingerprints, the engine interface, tokenizers, synthetic families. The vocabulary everything
else uses; it imports no other kvrelay layer (the engine factory is kvrelay.engines, the engine
kvrelay.backends)."""
