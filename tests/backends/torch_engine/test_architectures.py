"""Every supported architecture against Hugging Face transformers, on random-weight checkpoints built here.

Each architecture gets a small config (4 layers, hidden 64, 4 heads / 2 KV heads, vocab 256) with the
features that set it apart switched on, saved with save_pretrained(safe_serialization=True) and
loaded by the engine from its config.json like any model directory:

    llama          attention_bias and mlp_bias on (bias paths of the fused projections)
    qwen2          q/k/v bias, tied embeddings, sliding window off (its default)
    qwen2-sliding  use_sliding_window on layers >= max_window_layers (2 of 4), window 12
    mistral        sliding window 12 on every layer
    gemma3         layers sliding, sliding, global, sliding (window 12), head_dim 32 != hidden / heads,
                   query_pre_attn_scalar 24, final_logit_softcapping, local RoPE base 5000 vs global
                   100000 with linear scaling, QK-norm, sandwich norms, GeGLU, scaled embeddings

Sequences run past the window (12) so the window changes the answer (checked against the same
checkpoint with the window lifted). Weights: transformers' init with the matrices scaled x4 and norms
and biases moved off their init, so every parameter matters and logits are not near-uniform.
"""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvrelay.errors import KvRelayError
from kvrelay.model.architectures import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture
from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams
from kvrelay.model.plan import RecomputePlan

ATOL = 2e-4  # engine vs engine: the same kernels, fp32 rounding only (test_exactness.py)
ATOL_HF = 1e-3  # engine vs transformers: other kernels (test_exactness.py says why); a wrong mask is off by >1e-1
WINDOW = 12
SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


def _archs():
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    S, F = "sliding_attention", "full_attention"
    return {
        "llama": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "qwen2-sliding": (
            Qwen2Config,
            Qwen2ForCausalLM,
            dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
        ),
        "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW)),
        "gemma3": (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            dict(
                head_dim=32,
                sliding_window=WINDOW,
                layer_types=[S, S, F, S],
                query_pre_attn_scalar=24,
                final_logit_softcapping=5.0,
                rope_theta=100000.0,
                rope_local_base_freq=5000.0,
                rope_scaling={"rope_type": "linear", "factor": 2.0},
            ),
        ),
    }


ARCHS = ("llama", "qwen2", "qwen2-sliding", "mistral", "gemma3")
WINDOWED = ("qwen2-sliding", "mistral", "gemma3")


def _save(model, d: Path) -> Path:
    model.save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.json").write_text('{"model": {"type": "test-ids"}}')  # ids are the interface here
    return d


def _randomize(model, gen, scale):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.add_(0.2 * scale * noise)
            elif p.dim() == 1:
                p.add_(0.1 * scale * noise)
            else:
                p.mul_(4.0) if scale == 1 else p.add_(0.05 * p.std() * noise)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    """(name, base dir, variant dir): the variant is the base with every weight perturbed (a fine-tune)."""
    from transformers import AutoModelForCausalLM

    name = request.param
    cfg_cls, model_cls, kw = _archs()[name]
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(11)
    model = model_cls(cfg_cls(**SMALL, **kw)).eval()
    _randomize(model, gen, 1)
    base = _save(model, root / "base")
    _randomize(model, gen, 0)
    variant = _save(model, root / "variant")
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    return name, base, variant, hf


@pytest.fixture(scope="module")
def engines(arch):
    from kvrelay.backends.torch_engine.engine import TorchEngine

    name, base, variant, _ = arch
    cfg = lambda: EngineConfig(block_size=16, kv_cache_bytes=16 << 20)
    return TorchEngine.from_dir("base", base, cfg()), TorchEngine.from_dir("variant", variant, cfg())


def _toks(rng, n):
    return [rng.randrange(SMALL["vocab_size"]) for _ in range(n)]


def _hf_logits(hf, toks):
    with torch.no_grad():
        return hf(torch.tensor([toks])).logits[0]


def test_config_read_from_config_json(arch, engines):
    name, _, _, hf = arch
    S, _ = engines
    c, h = S.cfg, hf.config
    assert c.model_type == h.model_type and c.head_dim == (32 if name == "gemma3" else 16)
    assert c.sliding_window == (WINDOW if name in WINDOWED else None)
    assert c.tie_word_embeddings == h.tie_word_embeddings
    expected = {
        "mistral": [WINDOW] * 4,
        "qwen2-sliding": [None, None, WINDOW, WINDOW],
        "gemma3": [WINDOW, WINDOW, None, WINDOW],
    }.get(name, [None] * 4)
    assert [layer.window for layer in S.model.layers] == expected
    if name == "gemma3":
        assert (c.rope_theta, c.local_rope_theta, c.rope_scaling["factor"]) == (100000.0, 5000.0, 2.0)
        assert c.attn_scale == 24**-0.5 and c.final_logit_softcap == 5.0 and c.embed_scale == 8.0


def test_prefill_logits_equal_transformers(arch, engines, rng):
    name, base, _, hf = arch
    S, _ = engines
    for toks in (_toks(rng, 40), _toks(random.Random(3), 47)):
        ref = _hf_logits(hf, toks)
        assert (S.forward_dense(toks) - ref).abs().max() < ATOL_HF
    if name in WINDOWED:  # the window really changes the answer at these lengths
        from transformers import AutoModelForCausalLM

        wide = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, sliding_window=10**6).eval()
        assert (_hf_logits(wide, toks) - ref).abs().max() > 1e-2


def test_paged_prefill_extend_and_decode_equal_dense(arch, engines, rng):
    """Prefix-cached prefill-extend (start > 0) and decode apply the window as the dense path does."""
    S, _ = engines
    a = _toks(rng, 45)
    S.generate([Request("warm", a[:33], SamplingParams(max_tokens=1))])  # caches 2 full blocks
    out = S.generate([Request("ext", a, SamplingParams(max_tokens=8, ignore_eos=True, return_logits=8))])["ext"]
    assert out.prefill.cached_tokens == 32
    dense = S.forward_dense(a + out.output_tokens)
    for i, lg in enumerate(out.logits):
        assert (lg - dense[len(a) - 1 + i]).abs().max() < ATOL, i


def test_greedy_equals_transformers_generate(arch, engines, rng):
    """Three prompts decoded together (continuous batching); 20 steps each, crossing the window of 12."""
    from transformers import GenerationConfig

    _, _, _, hf = arch
    S, _ = engines
    prompts = {"short": _toks(rng, 5), "mid": _toks(rng, 23), "long": _toks(rng, 40)}
    outs = S.generate([Request(k, p, SamplingParams(max_tokens=20, ignore_eos=True)) for k, p in prompts.items()])
    gc = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    for k, p in prompts.items():
        with torch.no_grad():
            x = torch.tensor([p])  # an explicit mask: else generate masks every id equal to pad_token_id
            ref = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)[0, len(p) :].tolist()
        assert outs[k].output_tokens == ref, k


def _run(engine, prompt, plan=None, donor=None, rid="r"):
    out = engine.generate(
        [Request(rid, prompt, SamplingParams(max_tokens=1, return_logits=1), donor=donor, plan=plan, export_pages=True)]
    )[rid]
    return out.logits[0], out.pages, out.prefill


def test_recompute_all_layers_equals_full_prefill(engines, rng):
    S, R = engines
    ctx = _toks(rng, 40 + rng.randrange(16))
    pages = _run(S, ctx + _toks(rng, 9), rid="donor")[1]
    p_r = ctx + _toks(rng, 7)
    full_logits, full_pages, _ = _run(R, p_r, rid="full")
    logits, hybrid, info = _run(R, p_r, RecomputePlan.all(R.num_layers), pages, rid="all")
    assert info.reused_tokens == len(ctx) // 16 * 16 and info.recomputed_layers == R.num_layers
    assert (logits - full_logits).abs().max() < ATOL
    assert (hybrid.kv - full_pages.kv).abs().max() < ATOL
    n = min(pages.num_pages, full_pages.num_pages)
    assert (pages.kv[:n, -1] - full_pages.kv[:n, -1]).abs().max() > 1e-3  # the donor really differs


def test_partial_reprefill_from_own_pages_equals_full_prefill(engines, rng):
    S, _ = engines
    ctx = _toks(rng, 40 + rng.randrange(16))
    pages = _run(S, ctx + _toks(rng, 9), rid="donor")[1]
    p = ctx + _toks(rng, 7)
    full_logits, full_pages, _ = _run(S, p, rid="own")
    for plan in [RecomputePlan.none(), RecomputePlan(((2, 4),)), RecomputePlan(((0, 2),)), RecomputePlan.all(4)]:
        logits, hybrid, info = _run(S, p, plan, pages, rid=str(plan))
        assert info.reused_tokens >= 32
        assert (logits - full_logits).abs().max() < ATOL, plan
        assert (hybrid.kv[: hybrid.num_pages] - full_pages.kv[: hybrid.num_pages]).abs().max() < ATOL, plan


def test_project_kv_rebuilds_each_layers_kv(arch, engines, rng):
    """The K/V-correction seam: layers[l].project_kv(E_l, *rope(positions, l)) == the layer's cached K, V."""
    from kvrelay.backends.torch_engine.attention import DenseAttention

    name = arch[0]
    S, _ = engines
    toks = _toks(rng, 32)
    pages = _run(S, toks + [1], rid="pk")[1]
    model, pos = S.model, torch.arange(32)
    entering = {}
    with torch.inference_mode():
        model.run_layers(
            model.embed(torch.tensor(toks)),
            pos,
            DenseAttention(),
            0,
            S.num_layers,
            on_enter=lambda l, h: entering.__setitem__(l, h),
        )
        for l in range(S.num_layers):
            k, v = model.layers[l].project_kv(entering[l], *model.rope(pos, l))
            kv = pages.kv[:2, l].permute(1, 2, 0, 3, 4).flatten(2, 3)  # [2, H, 32, D]
            assert (k.transpose(0, 1) - kv[0]).abs().max() < ATOL and (v.transpose(0, 1) - kv[1]).abs().max() < ATOL, l
        if name == "gemma3":  # two RoPEs: asking for "the" RoPE is refused rather than silently wrong
            with pytest.raises(KvRelayError, match="rope"):
                model.rope(pos)
        else:
            assert torch.equal(model.rope(pos)[0], model.rope(pos, 1)[0])


# --- configs as published (older field names) and refusals ----------------------------------------


def test_published_config_fields_are_read():
    from kvrelay.backends.torch_engine.config import ModelConfig

    gemma = {  # google/gemma-3-270m config.json (transformers 4.x field names)
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "_sliding_window_pattern": 6,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "eos_token_id": 1,
    }
    c = ModelConfig.from_hf(gemma)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (c.rope_theta, c.local_rope_theta, c.rope_scaling, c.sliding_window) == (1e6, 1e4, None, 512)
    assert c.tie_word_embeddings and c.head_dim == 256 and c.attn_scale is not None
    qwen = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "max_window_layers": 21,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
    }
    c = ModelConfig.from_hf(qwen)  # Qwen2.5-0.5B: a window in the file, but switched off
    assert c.sliding_window is None and c.layer_types == () and c.qkv_bias and not c.o_bias and c.head_dim == 64


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    from safetensors.torch import save_file

    from kvrelay.backends.torch_engine.config import ModelConfig
    from kvrelay.backends.torch_engine.engine import TorchEngine

    phi = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    with pytest.raises(UnsupportedArchitecture) as e:
        ModelConfig.from_hf(phi)
    msg = str(e.value)
    assert "'phi3'" in msg and "Phi3ForCausalLM" in msg and all(m in msg for m in SUPPORTED_ARCHITECTURES)
    with pytest.raises(UnsupportedArchitecture, match="LlamaForSequenceClassification"):
        ModelConfig.from_hf({**phi, "model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})
    with pytest.raises(UnsupportedArchitecture, match="Gemma3ForCausalLM"):
        ModelConfig.from_hf({**phi, "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
    import json

    (tmp_path / "config.json").write_text(json.dumps(phi))
    (tmp_path / "tokenizer.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedArchitecture, match="phi3"):
        TorchEngine.from_dir("phi", tmp_path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    """A Qwen2 checkpoint whose config.json says llama: its q/k/v biases have no place, and that is an error."""
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kvrelay.backends.torch_engine.engine import TorchEngine

    d = _save(Qwen2ForCausalLM(Qwen2Config(**SMALL)), tmp_path / "mislabeled")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(KvRelayError, match="no place in a llama model"):
        TorchEngine.from_dir("x", d)


def test_supported_set_imports_without_torch():
    code = (
        "import sys; from kvrelay.model.architectures import SUPPORTED_ARCHITECTURES as S; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(S))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "gemma3_text" in out and "qwen2" in out


def test_real_gemma3_270m_matches_transformers_past_its_window():
    """The converted Gemma-3-270m (gemma-lora's base): a 530-token prompt, past its 512-token window,
    then 6 greedy steps, against transformers' generate."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from kvrelay.backends.torch_engine.engine import TorchEngine
    from kvrelay.families import is_built, load_family

    if not is_built("gemma-lora"):
        pytest.skip("gemma-lora is not built (kvrelay models build --family gemma-lora)")
    d = load_family("gemma-lora").model_dir("base")
    eng = TorchEngine.from_dir("base", d, EngineConfig(block_size=16, kv_cache_bytes=64 << 20))
    assert eng.cfg.sliding_window == 512 and [l for l in range(18) if eng.model.layers[l].window is None] == [5, 11, 17]
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    prompt = [2] + [random.Random(5).randrange(300, 200000) for _ in range(529)]
    out = eng.generate([Request("g", prompt, SamplingParams(max_tokens=6, ignore_eos=True, return_logits=1))])["g"]
    x = torch.tensor([prompt])
    with torch.no_grad():
        ref_logits = hf(x, logits_to_keep=1).logits[0, -1]
        ref = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            generation_config=GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0),
        )[0, len(prompt) :].tolist()
    scale = ref_logits.abs().max().item()
    assert (out.logits[0] - ref_logits).abs().max() < GEMMA_RTOL * scale
    assert out.output_tokens == ref


GEMMA_RTOL = 1e-4  # of the largest logit: 18 real layers with norm gains ~10 amplify fp32 kernel differences
