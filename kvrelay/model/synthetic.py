"""Model families with real shapes and random weights, for GPU benchmarks with nothing on disk.

Throughput depends on shapes, not on what the weights learned; quality is measured on real families.
"""

from __future__ import annotations

from kvrelay.errors import KvRelayError

# Llama-3-8B (config of meta-llama/Meta-Llama-3-8B), weights drawn at load time.
LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "eos_token_id": 128001,
}

SYNTHETIC = {
    # models: name -> weight seed. Variants are independent draws: as different as models can be.
    "llama8b-random": {"config": LLAMA3_8B, "models": {"base": 0, "v1": 1, "v2": 2}},
}


def is_synthetic(family: str) -> bool:
    return family in SYNTHETIC


def spec(family: str, **overrides) -> tuple[dict, dict[str, int]]:
    """(HF-style config, {model: seed}); overrides shrink shapes for tests on small machines."""
    if family not in SYNTHETIC:
        raise KvRelayError(f"unknown synthetic family {family!r}; known: {sorted(SYNTHETIC)}")
    s = SYNTHETIC[family]
    return {**s["config"], **overrides}, dict(s["models"])
