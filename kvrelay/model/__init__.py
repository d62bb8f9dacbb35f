"""A model and its KV: identity (spec), page format, recompute plans, fingerprints, the engine
interface and the engine factory, tokenizers, synthetic families. The vocabulary everything else uses."""
