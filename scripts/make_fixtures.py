#!/usr/bin/env python3
"""Regenerate every test fixture under tests/fixtures/ in one go.

Run from the repository root:

    .venv/bin/python scripts/make_fixtures.py

(needs the --dev Python tier from scripts/setup.sh: torch, transformers 4.57.x, sentencepiece,
safetensors, numpy, mistral-common; CPU only, no network, no model hub; takes about ten seconds).

What it writes, and why
-----------------------
The C++ toolkit (Eigen FP32 reference, CUDA paths, tokenizer, loaders) is tested against Hugging Face
transformers, which is the definition of "correct" for Mixtral-family models. The tests must run
offline and quickly, so this script produces small, committed oracles:

* tests/fixtures/tokenizers/fixture-bpe512.model
    A tiny SentencePiece BPE model (vocab 512, byte_fallback, unk=0 bos=1 eos=2, no pad,
    add_dummy_prefix) trained on Debian's /usr/share/common-licenses texts, so the fixture models
    have a real tokenizer.model of matching vocab size. Training is run single-threaded with no
    sampling or shuffling; it has been byte-identical across runs on the same machine, but the input
    texts come from the Debian `base-files` package, so a different Debian release could give a
    slightly different model (the corpus sha256 is recorded in tests/fixtures/README.md). The
    committed .model file, not this script, is the source of truth for the tests.
* tests/fixtures/tokenizers/mixtral-8x7b-v0.1.model (+ LICENSE-mistral-common.txt)
    The real Mixtral-8x7B-v0.1 / Mistral-7B v1 tokenizer, copied from the mistral-common wheel
    (data/tokenizer.model.v1), sha256-checked.
* tests/fixtures/tokenizers/{mixtral,fixture-bpe512}-ids.json
    Python sentencepiece encodings (no BOS) and decodings of awkward texts, as a tokenizer oracle.
* tests/fixtures/models/<name>/
    Four tiny random checkpoints written by transformers' save_pretrained (config.json,
    generation_config.json, safetensors, and a copy of fixture-bpe512.model as tokenizer.model):
      mixtral-4e-gqa-f32       4 experts top-2, GQA 4:1, F32, single file
      mixtral-8e-bf16-sharded  8 experts top-2, GQA 2:1, BF16, >=3 shards + index.json
      mixtral-top1-swa         4 experts top-1, sliding_window=4, tied lm_head, F32
      mistral-dense            MistralForCausalLM (dense MLP), F32
    Weights use a large initializer_range (0.15) so routing and logits are far from uniform, and
    every RMSNorm weight is set to 1 + 0.1*N(0,1) (transformers initialises them to exactly 1, which
    would hide a missing norm-weight multiply).
    Each folder has expected.safetensors, computed by transformers 4.57.x eager attention on a fixed
    12-token prompt, from the checkpoint as re-loaded from disk in float32 (and again in float64):
      tokens                    I32 [12]
      logits                    F32 [12, V]      float32 forward
      logits_f64                F64 [12, V]      float64 forward (higher-precision oracle)
      layers.{i}.hidden         F32 [12, H]      decoder layer i output (residual stream, pre final norm)
      layers.{i}.hidden_f64     F64 [12, H]
      layers.{i}.router_logits  F32 [12, E]      block_sparse_moe.gate output   (Mixtral only)
      layers.{i}.experts        I32 [12, k]      topk(softmax(router_logits)), rank order (Mixtral only)
      layers.{i}.gates          F32 [12, k]      the k softmax probs renormalised to sum 1 (Mixtral only)
      greedy_continuation       I32 [8]          mixtral-8e-bf16-sharded only: generate(do_sample=False)
    Layer outputs are captured with forward hooks on model.model.layers[i] and
    model.model.layers[i].block_sparse_moe.gate (output_hidden_states is not used: its last entry is
    taken after the final norm).
* tests/fixtures/configs/mixtral-8x7b-v0.1.json (+ README.md)
    The public config.json of mistralai/Mixtral-8x7B-v0.1, and total/active parameter counts that
    transformers gives for it (instantiated on the meta device, so no memory is used).
* tests/fixtures/README.md
    What is what, versions, measured float32-vs-float64 deviations and suggested tolerances.

Everything is deterministic: torch.manual_seed per model, sentencepiece seeded and single-threaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from safetensors.numpy import save_file as np_save_file
from safetensors import safe_open
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TOK_DIR = FIX / "tokenizers"
MODEL_DIR = FIX / "models"
CFG_DIR = FIX / "configs"

FIXTURE_TOKENIZER = TOK_DIR / "fixture-bpe512.model"
MIXTRAL_TOKENIZER = TOK_DIR / "mixtral-8x7b-v0.1.model"
MIXTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

LICENSE_FILES = ["Apache-2.0", "GPL-3", "LGPL-2.1", "MPL-2.0", "GFDL-1.3", "Artistic", "BSD", "CC0-1.0"]
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog, and the license grants permission to copy."
SEQ_LEN = 12
GREEDY_NEW_TOKENS = 8
INIT_RANGE = 0.15

# The public config.json of mistralai/Mixtral-8x7B-v0.1, verbatim (see /work/shared/notes/formats.md 1.1,
# quoted in NVIDIA/TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_mixtral.py).
MIXTRAL_8X7B_CONFIG_JSON = """{
  "architectures": ["MixtralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mixtral",
  "num_attention_heads": 32,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "num_local_experts": 8,
  "output_router_logits": false,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.02,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
}
"""
MIXTRAL_8X7B_TOTAL_PARAMS = 46_702_792_704

# Texts for the tokenizer oracles: (label, text).
TOKENIZER_TEXTS = [
    ("english", "The quick brown fox jumps over the lazy dog."),
    ("punctuation", "Hello, world! Isn't it great? (Yes: it's \"great\"; really...) -- 100% [sure] {ok} <tag> a/b\\c @#$^&*_+=|~`"),
    ("python", "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint(fib(10))\n"),
    ("cpp", "#include <vector>\nint main() {\n\tstd::vector<int> v{1, 2, 3};\n\tfor (auto& x : v) x *= 2;\n\treturn v[0] != 2;\n}\n"),
    ("french", "Le cœur déçu mais l'âme plutôt naïve, Louÿs rêva de crapaüter en canoë au delà des îles."),
    ("german", "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg. Äpfel, Öl, Übermaß, Straße."),
    ("chinese", "我能吞下玻璃而不伤身体。机器学习模型的专家混合。"),
    ("emoji", "Hi 👋🏽! Family: 👨‍👩‍👧‍👦, flag: 🇫🇷, heart: ❤️, rainbow flag: 🏳️‍🌈 ok"),
    ("whitespace_runs", "a  b   c    d\t\te\t \tf     \t\n\n  g"),
    ("leading_trailing_ws", "   leading and trailing spaces   "),
    ("digits", "1234567890 3.14159"),
    ("empty", ""),
    ("byte_fallback", "Rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎𠜱 ꙮ \u0001\u007f ᚠᛇᚻ ⨌ 🜁"),
]


def log(*a):
    print("[make_fixtures]", *a, flush=True)


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# 1. fixture tokenizer
# --------------------------------------------------------------------------------------------------
def make_fixture_tokenizer() -> dict:
    corpus = b""
    for name in LICENSE_FILES:
        corpus += (Path("/usr/share/common-licenses") / name).read_bytes()
        if not corpus.endswith(b"\n"):
            corpus += b"\n"
    text = corpus.decode("utf-8")
    lines = [ln for ln in text.split("\n") if ln.strip()]
    spm.set_random_generator_seed(1234)
    model_io = io.BytesIO()
    vocab_size = 512
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model_io,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=1 << 20,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    FIXTURE_TOKENIZER.write_bytes(model_io.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE_TOKENIZER))
    assert sp.get_piece_size() == vocab_size, sp.get_piece_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    return {
        "corpus_files": LICENSE_FILES,
        "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
        "corpus_lines": len(lines),
        "vocab_size": vocab_size,
        "sha256": sha256_file(FIXTURE_TOKENIZER),
    }


# --------------------------------------------------------------------------------------------------
# 2./3. fixture models and expected outputs
# --------------------------------------------------------------------------------------------------
MODEL_SPECS = {
    "mixtral-4e-gqa-f32": dict(
        cls="mixtral", dtype="float32", seed=1001, shard=None,
        cfg=dict(num_local_experts=4, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=1,
                 hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512,
                 max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=None,
                 tie_word_embeddings=False),
    ),
    "mixtral-8e-bf16-sharded": dict(
        cls="mixtral", dtype="bfloat16", seed=1002, shard="300KB",
        cfg=dict(num_local_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                 hidden_size=64, intermediate_size=96, num_hidden_layers=3, vocab_size=512,
                 max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
                 tie_word_embeddings=False),
    ),
    "mixtral-top1-swa": dict(
        cls="mixtral", dtype="float32", seed=1003, shard=None,
        cfg=dict(num_local_experts=4, num_experts_per_tok=1, num_attention_heads=4, num_key_value_heads=2,
                 hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=512,
                 max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=4,
                 tie_word_embeddings=True),
    ),
    "mistral-dense": dict(
        cls="mistral", dtype="float32", seed=1004, shard=None,
        cfg=dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, vocab_size=512, max_position_embeddings=64, rope_theta=10000.0,
                 rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False),
    ),
}

COMMON_CFG = dict(initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                  hidden_act="silu", attention_dropout=0.0)


def model_classes(kind):
    return (MixtralConfig, MixtralForCausalLM) if kind == "mixtral" else (MistralConfig, MistralForCausalLM)


def build_and_save(name: str, spec: dict) -> Path:
    cfg_cls, model_cls = model_classes(spec["cls"])
    out = MODEL_DIR / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(spec["seed"])
    config = cfg_cls(**COMMON_CFG, **spec["cfg"])
    model = model_cls._from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    model.eval()
    # Non-trivial RMSNorm weights (transformers initialises them to exactly 1).
    g = torch.Generator().manual_seed(spec["seed"] + 7)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("layernorm.weight") or pname == "model.norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    kw = dict(safe_serialization=True)
    if spec["shard"]:
        kw["max_shard_size"] = spec["shard"]
    model.save_pretrained(out, **kw)
    shutil.copyfile(FIXTURE_TOKENIZER, out / "tokenizer.model")
    return out


def check_saved_config(name: str, spec: dict, out: Path) -> dict:
    cfg = json.loads((out / "config.json").read_text())
    for k, v in spec["cfg"].items():
        assert k in cfg, f"{name}: config.json lacks {k}"
        assert cfg[k] == v, f"{name}: config.json {k}={cfg[k]!r}, wanted {v!r}"
    # transformers >= 4.56 writes "dtype" (older versions and the Hub files write "torch_dtype").
    assert cfg.get("dtype", cfg.get("torch_dtype")) == spec["dtype"], (name, cfg)
    assert cfg["initializer_range"] == INIT_RANGE
    files = sorted(p.name for p in out.iterdir())
    if spec["shard"]:
        idx = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(idx["weight_map"].values()))
        assert len(shards) >= 3, shards
    else:
        assert "model.safetensors" in files, files
    # Inspect the stored tensors: names, dtypes.
    st_files = [p for p in out.iterdir() if p.suffix == ".safetensors" and p.name != "expected.safetensors"]
    names, dtypes = [], set()
    for f in st_files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                names.append(k)
                dtypes.add(str(h.get_slice(k).get_dtype()))
    return {"config_keys": sorted(cfg.keys()), "files": files, "tensor_names": sorted(names),
            "stored_dtypes": sorted(dtypes), "sliding_window": cfg.get("sliding_window"),
            "tie_word_embeddings": cfg.get("tie_word_embeddings"),
            "has_lm_head": "lm_head.weight" in names}


def load(name: str, spec: dict, dtype=torch.float32, **overrides):
    _, model_cls = model_classes(spec["cls"])
    model = model_cls.from_pretrained(MODEL_DIR / name, dtype=dtype, attn_implementation="eager", **overrides)
    model.eval()
    return model


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def use_float64_rope(model) -> None:
    """Make the float64 run a true float64 oracle.

    transformers computes RoPE's inv_freq in float32 at init and its rotary forward forces float32
    ("autocast disabled, Force float32"), so after .double() the cos/sin tables still carry float32
    rounding (~3e-7 relative in the logits). Replace them by the same formula evaluated in float64.
    """
    rotary = model.model.rotary_emb
    cfg = model.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def forward(x, position_ids):
        freqs = position_ids[:, :, None].to(torch.float64) * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rotary.forward = forward


class Float64Islands:
    """Inside this context, transformers' float32 islands follow a float64 input instead.

    Even on a .double() model, transformers 4.57 computes RMSNorm (h.to(float32)), the attention
    softmax and the router softmax (dtype=torch.float32) in float32. For a float64 oracle those must
    run in float64 too; the math is otherwise unchanged.
    """

    def __enter__(self):
        import torch.nn.functional as F
        from transformers.models.mistral import modeling_mistral
        from transformers.models.mixtral import modeling_mixtral

        self._softmax = F.softmax
        original = F.softmax

        def softmax(input, dim=None, _stacklevel=3, dtype=None):
            if input.dtype == torch.float64:
                dtype = torch.float64
            return original(input, dim=dim, dtype=dtype)

        F.softmax = softmax

        def rms_forward(self, hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

        self._norms = [(cls, cls.forward) for cls in (modeling_mixtral.MixtralRMSNorm, modeling_mistral.MistralRMSNorm)]
        for cls, _ in self._norms:
            cls.forward = rms_forward
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F
        F.softmax = self._softmax
        for cls, fwd in self._norms:
            cls.forward = fwd
        return False


def run_hooked(model, tokens: torch.Tensor, is_moe: bool) -> dict:
    """One forward over all tokens (no cache); capture layer outputs and router logits with hooks."""
    caps = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: caps.__setitem__(f"layers.{i}.hidden", first(o).detach()[0].clone())))
        if is_moe:
            handles.append(layer.block_sparse_moe.gate.register_forward_hook(
                lambda m, a, o, i=i: caps.__setitem__(f"layers.{i}.router_logits", first(o).detach().clone())))
    try:
        with torch.no_grad():
            out = model(input_ids=tokens[None, :], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    caps["logits"] = out.logits.detach()[0].clone()
    return caps


def routing(router_logits: torch.Tensor, k: int):
    probs = torch.softmax(router_logits.float(), dim=-1)
    w, sel = torch.topk(probs, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    # Margin between the k-th and (k+1)-th probability (how robust the expert choice is).
    sp, _ = torch.sort(probs, dim=-1, descending=True)
    margin = (sp[:, k - 1] - sp[:, k]).min().item() if probs.shape[-1] > k else float("inf")
    return sel.to(torch.int32), w.to(torch.float32), margin


def make_expected(name: str, spec: dict, tokens: torch.Tensor) -> dict:
    is_moe = spec["cls"] == "mixtral"
    cfg = spec["cfg"]
    m32 = load(name, spec, torch.float32)
    assert next(m32.parameters()).dtype == torch.float32
    if spec["dtype"] == "bfloat16":
        # The upcast must be exact: every stored weight must equal its bf16 rounding.
        for p in m32.parameters():
            assert torch.equal(p, p.to(torch.bfloat16).to(torch.float32))
    c32 = run_hooked(m32, tokens, is_moe)
    m64 = load(name, spec, torch.float32).double()
    use_float64_rope(m64)
    with Float64Islands():
        c64 = run_hooked(m64, tokens, is_moe)

    L, H, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    tensors = {"tokens": tokens.numpy().astype(np.int32)}
    assert c32["logits"].shape == (SEQ_LEN, V) and c32["logits"].dtype == torch.float32
    assert c64["logits"].dtype == torch.float64
    tensors["logits"] = c32["logits"].numpy().astype(np.float32)
    tensors["logits_f64"] = c64["logits"].numpy().astype(np.float64)
    stats = {"logits_absmax": c64["logits"].abs().max().item(),
             "logits_f32_vs_f64_maxabs": (c32["logits"].double() - c64["logits"]).abs().max().item(),
             "hidden_f32_vs_f64_maxabs": [], "hidden_absmax": [], "route_margin_min": [],
             "experts_f32_eq_f64": []}
    for i in range(L):
        h32, h64 = c32[f"layers.{i}.hidden"], c64[f"layers.{i}.hidden"]
        assert h32.shape == (SEQ_LEN, H), h32.shape
        tensors[f"layers.{i}.hidden"] = h32.numpy().astype(np.float32)
        tensors[f"layers.{i}.hidden_f64"] = h64.numpy().astype(np.float64)
        stats["hidden_f32_vs_f64_maxabs"].append((h32.double() - h64).abs().max().item())
        stats["hidden_absmax"].append(h64.abs().max().item())
        if is_moe:
            k, E = cfg["num_experts_per_tok"], cfg["num_local_experts"]
            rl = c32[f"layers.{i}.router_logits"]
            assert rl.shape == (SEQ_LEN, E), rl.shape
            sel, w, margin = routing(rl, k)
            sel64, _, _ = routing(c64[f"layers.{i}.router_logits"], k)
            tensors[f"layers.{i}.router_logits"] = rl.numpy().astype(np.float32)
            tensors[f"layers.{i}.experts"] = sel.numpy().astype(np.int32)
            tensors[f"layers.{i}.gates"] = w.numpy().astype(np.float32)
            stats["route_margin_min"].append(margin)
            stats["experts_f32_eq_f64"].append(bool(torch.equal(sel, sel64)))
            stats.setdefault("experts_used", []).append(sorted(set(sel.flatten().tolist())))

    # Sanity: final logits = lm_head(norm(last hidden)), i.e. the hook captured pre-norm states.
    with torch.no_grad():
        re = m32.lm_head(m32.model.norm(c32[f"layers.{L - 1}.hidden"][None]))[0]
    assert torch.allclose(re, c32["logits"], atol=1e-5), "hooked last hidden does not reproduce logits"

    if name == "mixtral-8e-bf16-sharded":
        gen = greedy(m32, tokens)
        tensors["greedy_continuation"] = gen["tokens"].numpy().astype(np.int32)
        stats["greedy"] = gen
    np_save_file(tensors, str(MODEL_DIR / name / "expected.safetensors"))
    stats["keys"] = {k: (str(v.dtype), list(v.shape)) for k, v in tensors.items()}
    return stats


def greedy(model, tokens: torch.Tensor) -> dict:
    gc = model.generation_config
    with torch.no_grad():
        out = model.generate(tokens[None, :], do_sample=False, use_cache=True,
                             max_new_tokens=GREEDY_NEW_TOKENS, min_new_tokens=0,
                             eos_token_id=None, pad_token_id=0,
                             temperature=None, top_p=None, top_k=None)
    new = out[0, SEQ_LEN:]
    assert new.shape == (GREEDY_NEW_TOKENS,), new.shape
    # Cross-check with a cache-free argmax loop, and record the top1-top2 logit margins.
    seq = tokens.clone()
    margins = []
    with torch.no_grad():
        for _ in range(GREEDY_NEW_TOKENS):
            lg = model(input_ids=seq[None], use_cache=False).logits[0, -1]
            top2 = torch.topk(lg, 2).values
            margins.append((top2[0] - top2[1]).item())
            seq = torch.cat([seq, lg.argmax().view(1)])
    nocache = seq[SEQ_LEN:]
    return {"tokens": new.to(torch.int32), "list": new.tolist(), "matches_nocache_argmax": bool(torch.equal(new, nocache)),
            "top1_top2_margin_min": min(margins), "eos_in_continuation": 2 in new.tolist()}


def check_sliding_window(spec: dict, tokens: torch.Tensor) -> dict:
    """Does transformers' eager Mixtral apply sliding_window=4, and with which convention?"""
    name = "mixtral-top1-swa"
    res = {}
    outs = {}
    for w in (None, 3, 4, 5):
        m = load(name, spec, torch.float64, sliding_window=w)
        assert m.config.sliding_window == w
        with torch.no_grad():
            outs[w] = m(input_ids=tokens[None], use_cache=False).logits[0]
    # Per position: does W=4 differ from no window?
    diff_none = [(outs[4][p] - outs[None][p]).abs().max().item() for p in range(SEQ_LEN)]
    res["max_abs_diff_w4_vs_none_per_pos"] = diff_none
    res["w4_equals_none_for_pos_lt_4"] = all(d == 0.0 for d in diff_none[:4])
    res["w4_differs_for_pos_ge_4"] = all(d > 1e-9 for d in diff_none[4:])
    # Convention: query q sees keys q-W+1..q (W keys including itself).
    d34 = [(outs[4][p] - outs[3][p]).abs().max().item() for p in range(SEQ_LEN)]
    d45 = [(outs[4][p] - outs[5][p]).abs().max().item() for p in range(SEQ_LEN)]
    res["w3_vs_w4_first_differing_pos"] = next(p for p, d in enumerate(d34) if d > 0)
    res["w4_vs_w5_first_differing_pos"] = next(p for p, d in enumerate(d45) if d > 0)
    # Independent check: a hand-built 4D additive mask (allowed iff q-4 < k <= q) with no config window.
    m = load(name, spec, torch.float64, sliding_window=None)
    q = torch.arange(SEQ_LEN)[:, None]
    k = torch.arange(SEQ_LEN)[None, :]
    allowed = (k <= q) & (k > q - 4)
    mask = torch.zeros(SEQ_LEN, SEQ_LEN, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    with torch.no_grad():
        lg = m(input_ids=tokens[None], attention_mask=mask[None, None], use_cache=False).logits[0]
    res["w4_vs_manual_mask_maxabs"] = (lg - outs[4]).abs().max().item()
    return res


# --------------------------------------------------------------------------------------------------
# 4. real Mixtral tokenizer and tokenizer oracles
# --------------------------------------------------------------------------------------------------
def copy_mixtral_tokenizer() -> dict:
    import mistral_common
    pkg_dir = Path(mistral_common.__file__).resolve().parent
    src = pkg_dir / "data" / "tokenizer.model.v1"
    shutil.copyfile(src, MIXTRAL_TOKENIZER)
    digest = sha256_file(MIXTRAL_TOKENIZER)
    version = getattr(mistral_common, "__version__", None)
    if version is None:
        from importlib.metadata import version as v
        version = v("mistral_common")
    # License: the wheel's dist-info has no LICENSE file (METADATA says License-Expression: Apache-2.0),
    # so the Apache-2.0 text comes from Debian's common-licenses.
    from importlib.metadata import distribution
    dist = distribution("mistral_common")
    lic_text = None
    for f in dist.files or []:
        if "LICENSE" in f.name.upper() or "COPYING" in f.name.upper():
            lic_text = Path(dist.locate_file(f)).read_text()
            lic_src = f"mistral_common-{version}.dist-info/{f.name}"
            break
    if lic_text is None:
        lic_text = Path("/usr/share/common-licenses/Apache-2.0").read_text()
        lic_src = ("/usr/share/common-licenses/Apache-2.0 (the wheel ships no license file; its METADATA "
                   "declares License-Expression: Apache-2.0)")
    note = (
        "SOURCE\n"
        "======\n"
        f"mixtral-8x7b-v0.1.model is a byte-for-byte copy of mistral_common/data/tokenizer.model.v1 from the\n"
        f"PyPI package mistral-common {version} (https://github.com/mistralai/mistral-common), which is\n"
        f"licensed under the Apache License 2.0. sha256: {digest}\n"
        "This is the SentencePiece tokenizer of Mistral-7B-v0.1 / Mixtral-8x7B-v0.1 (vocab 32000).\n"
        f"License text below taken from: {lic_src}\n\n"
        + "=" * 78 + "\n\n"
    )
    (TOK_DIR / "LICENSE-mistral-common.txt").write_text(note + lic_text)
    return {"version": version, "path_in_package": "mistral_common/data/tokenizer.model.v1", "sha256": digest,
            "sha256_ok": digest == MIXTRAL_TOKENIZER_SHA256}


def write_ids(model_path: Path, out_path: Path) -> list:
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    rows = []
    for label, text in TOKENIZER_TEXTS:
        ids = sp.encode(text, out_type=int)
        rows.append({"label": label, "text": text, "ids": ids,
                     "pieces": [sp.id_to_piece(i) for i in ids], "decoded": sp.decode(ids)})
    out_path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return rows


# --------------------------------------------------------------------------------------------------
# 5. Mixtral-8x7B config and parameter counts
# --------------------------------------------------------------------------------------------------
def write_mixtral_config() -> dict:
    path = CFG_DIR / "mixtral-8x7b-v0.1.json"
    path.write_text(MIXTRAL_8X7B_CONFIG_JSON)
    d = json.loads(MIXTRAL_8X7B_CONFIG_JSON)
    config = MixtralConfig(**{k: v for k, v in d.items() if k not in ("transformers_version",)})
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == MIXTRAL_8X7B_TOTAL_PARAMS, total
    embed = model.model.embed_tokens.weight.numel()
    lm_head = model.lm_head.weight.numel()
    final_norm = model.model.norm.weight.numel()
    layer = model.model.layers[0]
    attn = sum(p.numel() for p in layer.self_attn.parameters())
    norms = layer.input_layernorm.weight.numel() + layer.post_attention_layernorm.weight.numel()
    router = layer.block_sparse_moe.gate.weight.numel()
    expert = sum(p.numel() for p in layer.block_sparse_moe.experts[0].parameters())
    L, k, E = config.num_hidden_layers, config.num_experts_per_tok, config.num_local_experts
    per_layer_total = attn + norms + router + E * expert
    assert embed + lm_head + final_norm + L * per_layer_total == total
    per_layer_active = attn + norms + router + k * expert
    active = embed + lm_head + final_norm + L * per_layer_active
    counts = dict(total=total, active=active, embed=embed, lm_head=lm_head, final_norm=final_norm,
                  per_layer_attention=attn, per_layer_norms=norms, per_layer_router=router,
                  per_expert=expert, layers=L, experts=E, top_k=k,
                  per_layer_total=per_layer_total, per_layer_active=per_layer_active,
                  total_bytes_bf16=2 * total, config_sha256=sha256_file(path))
    readme = f"""# tests/fixtures/configs

## mixtral-8x7b-v0.1.json

The public `config.json` of the Hugging Face repository `mistralai/Mixtral-8x7B-v0.1`, copied verbatim.
The Hub file itself was not available offline; the same JSON is quoted, identical in content, as
`MIXTRAL_8X7B_CONFIG` in NVIDIA/TensorRT-LLM `tests/unittest/_torch/modeling/test_modeling_mixtral.py`
(see also /work/shared/notes/formats.md section 1.1). sha256 of this file: `{counts['config_sha256']}`.

Note: it has no `head_dim` key (derived: 4096 / 32 = 128), `sliding_window` is null (plain causal mask),
and `router_aux_loss_coef` is 0.02.

## Parameter counts (independent oracle for the C++ count)

Computed by `scripts/make_fixtures.py` with transformers {transformers.__version__}: `MixtralConfig(**json)`,
`MixtralForCausalLM` instantiated under `torch.device("meta")`, then summing `numel()` over parameters.

| quantity | count |
|---|---:|
| **total parameters** | **{total:,}** ({total}) |
| **active parameters per token** | **{active:,}** ({active}) |
| embed_tokens | {embed:,} |
| lm_head (untied) | {lm_head:,} |
| final norm | {final_norm:,} |
| per layer: attention (q, k, v, o) | {attn:,} |
| per layer: 2 RMSNorms | {norms:,} |
| per layer: router (gate) | {router:,} |
| per expert (w1 + w2 + w3) | {expert:,} |
| per layer total (all {E} experts) | {per_layer_total:,} |
| per layer active (top-{k} experts) | {per_layer_active:,} |
| layers | {L} |
| total bytes in bf16 | {2 * total:,} |

active = embed + lm_head + final norm + {L} x (attention + 2 norms + router + {k} x expert).
"""
    (CFG_DIR / "README.md").write_text(readme)
    return counts


# --------------------------------------------------------------------------------------------------
# 6. README
# --------------------------------------------------------------------------------------------------
def write_readme(info: dict) -> None:
    tok = info["fixture_tokenizer"]
    mt = info["mixtral_tokenizer"]
    lines = []
    A = lines.append
    A("# tests/fixtures\n")
    A("Generated by `scripts/make_fixtures.py` (run `.venv/bin/python scripts/make_fixtures.py` from the")
    A("repository root; it deletes and rewrites the model folders and rewrites every other file here).")
    A(f"Generated with: python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, sentencepiece {spm.__version__}, numpy {np.__version__}, "
      f"mistral-common {mt['version']}. CPU only.\n")
    A("## tokenizers/\n")
    A(f"- `fixture-bpe512.model`: SentencePiece BPE, vocab {tok['vocab_size']}, byte_fallback, unk=0 bos=1 eos=2,")
    A("  pad=-1, add_dummy_prefix=true, remove_extra_whitespaces=false, normalization `identity`,")
    A("  split_digits=true, character_coverage=1.0. Trained single-threaded, no shuffling, on the")
    A(f"  non-blank lines of `/usr/share/common-licenses/{{{','.join(tok['corpus_files'])}}}` concatenated")
    A(f"  ({tok['corpus_lines']} lines, corpus sha256 `{tok['corpus_sha256']}`).")
    A(f"  Model sha256 `{tok['sha256']}`. Training was byte-identical across repeated runs here; another")
    A("  Debian release may ship different license texts and give a different model, so treat the committed")
    A("  file as the source of truth. Every model folder holds a copy as `tokenizer.model`.")
    A(f"- `mixtral-8x7b-v0.1.model`: the real Mixtral-8x7B-v0.1 tokenizer (vocab 32000), a copy of")
    A(f"  `{mt['path_in_package']}` from mistral-common {mt['version']}, sha256 `{mt['sha256']}`.")
    A("  Apache-2.0; see `LICENSE-mistral-common.txt`.")
    A("- `mixtral-ids.json`, `fixture-bpe512-ids.json`: lists of `{label, text, ids, pieces, decoded}`;")
    A("  `ids` = Python sentencepiece `encode(text, out_type=int)` **without BOS** (tests add BOS),")
    rt = info["roundtrip"]
    A(f"  `decoded` = `decode(ids)`; `decoded == text` for {rt['ok']} of {rt['n']} entries"
      + (f" (not for: {', '.join(rt['bad'])})." if rt["bad"] else ".") + " `pieces` is informational.")
    A("  Texts cover English, punctuation, Python, C++, French, German,")
    A("  Chinese, emoji incl. ZWJ sequences and flags, runs of spaces/tabs/newlines, leading/trailing")
    A("  spaces, digits, the empty string, and characters that need byte fallback.\n")
    A("## models/\n")
    A(f"Tiny random checkpoints saved by transformers `save_pretrained(safe_serialization=True)`;")
    A(f"initializer_range {INIT_RANGE}; every RMSNorm weight = 1 + 0.1*N(0,1); seeds fixed per model.")
    A(f"Prompt: the fixture tokenizer's encoding of `{PROMPT_TEXT}` with BOS prepended, truncated to {SEQ_LEN}:")
    A(f"`{info['tokens']}` (stored as `tokens` in every expected.safetensors).\n")
    A("| folder | class | E / top-k | heads / kv | hidden / inter | layers | rope_theta | window | tied | stored |")
    A("|---|---|---|---|---|---|---|---|---|---|")
    for name, spec in MODEL_SPECS.items():
        c = spec["cfg"]
        ek = f"{c['num_local_experts']} / {c['num_experts_per_tok']}" if spec["cls"] == "mixtral" else "dense"
        m = info["models"][name]
        nfiles = len([f for f in m["files"] if f.endswith(".safetensors") and f != "expected.safetensors"])
        stored = spec["dtype"].upper().replace("FLOAT32", "F32").replace("BFLOAT16", "BF16") + f", {nfiles} file(s)"
        A(f"| `{name}` | {'Mixtral' if spec['cls']=='mixtral' else 'Mistral'}ForCausalLM | {ek} | "
          f"{c['num_attention_heads']} / {c['num_key_value_heads']} | {c['hidden_size']} / {c['intermediate_size']} | "
          f"{c['num_hidden_layers']} | {c['rope_theta']:g} | {c['sliding_window'] or 'null'} | {str(c['tie_word_embeddings']).lower()} | {stored} |")
    A("\nAll use vocab 512, rms_norm_eps 1e-5, silu, no biases. `mixtral-8e-bf16-sharded` is sharded with")
    A("`max_shard_size=\"300KB\"` into several `model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json`.")
    A("`mixtral-top1-swa` has `tie_word_embeddings: true`, so its safetensors has **no** `lm_head.weight`")
    A("(the loader must reuse `model.embed_tokens.weight`).\n")
    A("### expected.safetensors\n")
    A("Computed by transformers eager attention from the checkpoint re-loaded with")
    A("`from_pretrained(dtype=torch.float32, attn_implementation=\"eager\")` (for the BF16 model this upcast is")
    A("exact), one forward of all 12 tokens, no cache; `*_f64` from the same model after `.double()`,")
    A("with transformers' float32 islands (RMSNorm, attention and router softmax, RoPE tables) moved to")
    A("float64 (`Float64Islands`, `use_float64_rope`), so they are a true float64 evaluation of the same math.")
    A("Captured with forward hooks on `model.model.layers[i]` (decoder layer output = residual stream, before")
    A("the final norm) and `model.model.layers[i].block_sparse_moe.gate` (router logits).\n")
    A("| key | dtype | shape | meaning |")
    A("|---|---|---|---|")
    A("| `tokens` | I32 | [12] | prompt ids (BOS first) |")
    A("| `logits` | F32 | [12, 512] | float32 forward |")
    A("| `logits_f64` | F64 | [12, 512] | float64 forward |")
    A("| `layers.{i}.hidden` | F32 | [12, H] | output of decoder layer i |")
    A("| `layers.{i}.hidden_f64` | F64 | [12, H] | same, float64 |")
    A("| `layers.{i}.router_logits` | F32 | [12, E] | gate output (Mixtral only) |")
    A("| `layers.{i}.experts` | I32 | [12, k] | `topk(softmax(router_logits), k)` indices, rank order (Mixtral only) |")
    A("| `layers.{i}.gates` | F32 | [12, k] | those k probabilities renormalised to sum 1 (Mixtral only) |")
    A("| `greedy_continuation` | I32 | [8] | `mixtral-8e-bf16-sharded` only: `generate(do_sample=False, use_cache=True, max_new_tokens=8, eos_token_id=None)` |")
    A("\n### Measured precision and suggested tolerances\n")
    A("| model | max\\|logit\\| | logits f32 vs f64 | hidden f32 vs f64 (per layer) | min top-k routing margin (prob) | experts f32 == f64 |")
    A("|---|---|---|---|---|---|")
    for name in MODEL_SPECS:
        s = info["models"][name]["expected"]
        hid = ", ".join(f"{x:.1e}" for x in s["hidden_f32_vs_f64_maxabs"])
        marg = ", ".join(f"{x:.3g}" for x in s["route_margin_min"]) or "n/a"
        eq = str(all(s["experts_f32_eq_f64"])) if s["experts_f32_eq_f64"] else "n/a"
        A(f"| `{name}` | {s['logits_absmax']:.2f} | {s['logits_f32_vs_f64_maxabs']:.1e} | {hid} | {marg} | {eq} |")
    g = info["models"]["mixtral-8e-bf16-sharded"]["expected"]["greedy"]
    A(f"\nGreedy continuation `{g['list']}`: equals a cache-free argmax loop: {g['matches_nocache_argmax']}; "
      f"smallest top1-top2 logit margin {g['top1_top2_margin_min']:.3g}.\n")
    A("Suggested use: an FP32 implementation should match `*_f64` to atol ~1e-4 (logits, hidden) and the")
    A("F32 tensors to atol ~2e-4 / rtol 1e-4 (the F32 oracle itself carries the error in the column above);")
    A("`experts` must match exactly (the routing margins above are far larger than FP32 error) and `gates`")
    A("to ~1e-5. A BF16 compute path should be compared with looser tolerances (atol ~5e-2 on logits) and")
    A("may legitimately flip experts only where the margin is tiny. Greedy tokens must match exactly.\n")
    sw = info["sliding_window"]
    A("### Sliding window (mixtral-top1-swa)\n")
    A(f"transformers {transformers.__version__} eager Mixtral **does** apply `sliding_window`: with W=4 the logits equal")
    A(f"the no-window ones for positions 0-3 ({sw['w4_equals_none_for_pos_lt_4']}) and differ for every position >= 4")
    A(f"({sw['w4_differs_for_pos_ge_4']}). W=3 vs W=4 first differ at position {sw['w3_vs_w4_first_differing_pos']}, W=4 vs W=5 at")
    A(f"position {sw['w4_vs_w5_first_differing_pos']}, i.e. query q attends keys q-W+1..q (W keys including itself). A hand-built")
    A(f"additive mask with that rule reproduces the W=4 logits (max abs diff {sw['w4_vs_manual_mask_maxabs']:.1e}, float64).\n")
    A("## configs/\n")
    A("`mixtral-8x7b-v0.1.json` (public Mixtral-8x7B-v0.1 config.json) and README.md with its source and the")
    A(f"parameter counts from transformers: total {info['param_counts']['total']:,}, active {info['param_counts']['active']:,}.")
    (FIX / "README.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
def main() -> None:
    torch.set_num_threads(1)  # deterministic summation order on CPU
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for d in (TOK_DIR, MODEL_DIR, CFG_DIR):
        d.mkdir(parents=True, exist_ok=True)
    info = {}

    log("1. fixture tokenizer")
    info["fixture_tokenizer"] = make_fixture_tokenizer()
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE_TOKENIZER))
    ids = [sp.bos_id()] + sp.encode(PROMPT_TEXT, out_type=int)
    assert len(ids) >= SEQ_LEN, f"prompt too short for the fixture tokenizer: {len(ids)} ids"
    tokens = torch.tensor(ids[:SEQ_LEN], dtype=torch.long)
    info["tokens"] = tokens.tolist()
    log("   tokens", info["tokens"], [sp.id_to_piece(i) for i in info["tokens"]])

    log("2./3. models")
    info["models"] = {}
    for name, spec in MODEL_SPECS.items():
        out = build_and_save(name, spec)
        m = check_saved_config(name, spec, out)
        m["expected"] = make_expected(name, spec, tokens)
        m["files"] = sorted(p.name for p in out.iterdir())
        info["models"][name] = m
        log(f"   {name}: files {m['files']}, dtypes {m['stored_dtypes']}, lm_head stored {m['has_lm_head']}")
        e = m["expected"]
        log(f"     logits f32-f64 {e['logits_f32_vs_f64_maxabs']:.2e}, hidden f32-f64 {e['hidden_f32_vs_f64_maxabs']}, "
            f"margins {e['route_margin_min']}, experts eq {e['experts_f32_eq_f64']}, used {e.get('experts_used')}")
    info["sliding_window"] = check_sliding_window(MODEL_SPECS["mixtral-top1-swa"], tokens)
    log("   sliding window:", info["sliding_window"])
    assert info["sliding_window"]["w4_equals_none_for_pos_lt_4"] and info["sliding_window"]["w4_differs_for_pos_ge_4"], \
        "transformers did not apply sliding_window for Mixtral eager"
    log("   greedy:", {k: v for k, v in info["models"]["mixtral-8e-bf16-sharded"]["expected"]["greedy"].items() if k != "tokens"})

    log("4. tokenizers")
    info["mixtral_tokenizer"] = copy_mixtral_tokenizer()
    if not info["mixtral_tokenizer"]["sha256_ok"]:
        log("   WARNING: tokenizer.model.v1 sha256 mismatch:", info["mixtral_tokenizer"]["sha256"])
    rows = [("mixtral", r) for r in write_ids(MIXTRAL_TOKENIZER, TOK_DIR / "mixtral-ids.json")]
    rows += [("fixture", r) for r in write_ids(FIXTURE_TOKENIZER, TOK_DIR / "fixture-bpe512-ids.json")]
    bad = [f"{t}:{r['label']}" for t, r in rows if r["decoded"] != r["text"]]
    info["roundtrip"] = {"n": len(rows), "ok": len(rows) - len(bad), "bad": bad}

    log("5. Mixtral-8x7B config")
    info["param_counts"] = write_mixtral_config()
    log("   params", info["param_counts"]["total"], "active", info["param_counts"]["active"])

    log("6. README")
    write_readme(info)
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    log(f"done: {total / 1e6:.2f} MB under {FIX.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
