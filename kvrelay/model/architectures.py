"""The model architectures kvrelay's engine runs: the one list every check reads (no torch import).

    SUPPORTED_ARCHITECTURES["qwen2"]    # ("Qwen2ForCausalLM",): HF model_type -> its causal-LM classes
    check_supported(hf_config, where)   # the model_type, or a clear error naming what was found

The engine (backends/torch_engine/config.py) reads each architecture's fields; registration of user
models and family builders validate against this set before any slow work.
"""

from __future__ import annotations

from kvrelay.errors import KvRelayError

# HF config.json "model_type" -> the "architectures" classes with that model_type the engine runs.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "gemma3_text": ("Gemma3ForCausalLM",),
}


class UnsupportedArchitecture(KvRelayError):
    """A model whose config.json names an architecture the engine does not run."""


def supported_text() -> str:
    return ", ".join(f"{m} ({', '.join(a)})" for m, a in SUPPORTED_ARCHITECTURES.items())


def check_supported(cfg: dict, where: str = "") -> str:
    """The model_type of HF config `cfg` if the engine runs it; UnsupportedArchitecture otherwise,
    naming the model_type and architectures found and the supported ones."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    allowed = SUPPORTED_ARCHITECTURES.get(model_type)
    bad = [a for a in archs if allowed is not None and a not in allowed]
    if allowed is None or bad:
        found = f"model_type {model_type!r}, architectures {list(archs)}"
        hint = ""
        if model_type == "gemma3":  # the multimodal wrapper; its text tower is gemma3_text
            hint = (
                "; a Gemma-3 vision-language checkpoint (Gemma3ForConditionalGeneration) is not a "
                "text-only model: use its text model (Gemma3ForCausalLM, model_type gemma3_text)"
            )
        raise UnsupportedArchitecture(
            f"{where + ': ' if where else ''}{found} is not supported; the engine runs "
            f"model_type (architectures): {supported_text()}{hint}"
        )
    return model_type
