#!/usr/bin/env python3
"""Regenerate the QLoRA training fixtures under tests/fixtures/train/ (peft + transformers as the oracle).

Run from the repository root (CPU only, no network, about half a minute):

    .venv/bin/python scripts/make_train_fixtures.py            # rewrites every case (keeps moelab_adapter/)
    .venv/bin/python scripts/make_train_fixtures.py --check-moelab-adapter
                                                               # only: peft's logits for the adapters moelab
                                                               # trained (<case>/moelab_adapter/)

Needs the --dev Python tier of scripts/setup.sh (torch 2.9.1, transformers 4.57.3, peft 0.21.2,
bitsandbytes 0.49.2; the script refuses other versions of the last three: the loss, the optimizer step, the
schedule, the adapter format and the NF4 rounding are theirs). torch's CPU kernels are pinned to AVX2 and one
thread, as in scripts/make_nf4_fixtures.py: bitsandbytes' 8-bit map (torch.linspace) and double-quantization
offset (torch.mean) depend on them in the last bits.

What and why
------------
`moelab finetune` trains LoRA factors on a frozen NF4 base (train/). Its loss, gradients and optimizer must be
what transformers + peft + torch compute for QLoRA. This script runs that recipe on the fixture models and
records every number the C++ test (tests/test_train_parity.cpp) compares, so the test needs no Python:

1. The frozen base as QLoRA holds it. Every weight moelab quantizes (ModelConfig::nf4_weight_names(): q/k/v/o,
   the router gate, each expert's w1/w3/w2, or the dense MLP's gate/up/down_proj; embeddings, norms and
   lm_head stay float) is quantized with bitsandbytes.functional.quantize_4bit(W, blocksize=64,
   compress_statistics=True, quant_type="nf4") and dequantized to FP32 (the flat rule of bitsandbytes'
   pure-torch kernel: code[q] * absmax, absmax = map8[qabsmax] * nested_absmax + offset). The 8-bit map is the
   fresh create_dynamic_map(), i.e. the CUDA one moelab writes: bitsandbytes' CPU quantizer overwrites entry 0
   with -1.0 (tests/fixtures/nf4/README.md, finding 3); blocks with 8-bit code 0 are counted in the README,
   and bitsandbytes' own dequantization is asserted equal wherever that entry is not used. Those values are
   loaded into the float32 model (MixtralForCausalLM or MistralForCausalLM, eager attention, training mode),
   asserted bit-equal to what was loaded, and summarized per weight in expected.safetensors (nf4_checksum.*)
   so the C++ test checks that moelab's own NF4 round trip of the float checkpoint gives the same base.
2. peft: LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, ...) after
   torch.manual_seed(seed), get_peft_model. Both factors hold nn.Linear's seeded Kaiming-uniform values (peft's
   default B = 0 would make every A gradient zero). Saved by save_pretrained into init_adapter/.
3. A fixed batch of 3 sequences of different lengths (random tokens in [3, vocab)), labels -100 on a prompt
   prefix of each, run as one right-padded batch (attention_mask, -100 on the padding), as a peft user
   trains. The script checks that this equals running each sequence alone (logits, loss; causal attention
   makes right padding invisible to the real tokens), which is how moelab runs a batch.
4. Step 0: loss = CE + router_aux_loss_coef * aux (MixtralForCausalLM's loss with output_router_logits), CE
   and aux split (aux recomputed with transformers' load_balancing_loss_func and asserted equal), and the
   gradient of every LoRA factor after the first backward. The same in float64 (the model .double(), RoPE and
   transformers' float32 islands moved to float64 by make_fixtures.py's use_float64_rope / Float64Islands, the
   loss and aux evaluated in float64 by this script, sequences run one by one): the oracle a float64
   implementation meets to ~1e-12 and the yardstick for FP32 tolerances.
5. 10 optimizer steps on the same batch: torch.optim.AdamW(lr, betas (0.9, 0.999), eps 1e-8,
   weight_decay 0.01, foreach=False), torch.nn.utils.clip_grad_norm_(max_norm=1.0) before each step,
   transformers.get_cosine_schedule_with_warmup(warmup 2, total 10) stepped after each step. Per step: the
   loss before the step, the learning rate the step used, the gradient norm before clipping. Run in float32
   (the peft model) and in float64 (the same recipe on the float64 model).
6. The trained float32 adapter (save_pretrained into trained_adapter/) and transformers' logits with it on a
   held-out sequence, float32 and float64 (the float32 factors loaded onto the float64 model).

Cases: mixtral-4e-gqa-f32 (top-2, GQA 4:1, every module moelab adapts, router aux loss on), mixtral-top1-swa
(top-1, sliding window 4 < every sequence, tied lm_head, rsLoRA, attention + w2), mistral-dense (the dense MLP).

Files per case (tests/fixtures/train/<case>/):
  init_adapter/adapter_config.json, adapter_model.safetensors      peft's save_pretrained (base_model_name_or_path
  trained_adapter/adapter_config.json, adapter_model.safetensors   rewritten to the repository-relative model
                                                                    folder, target_modules sorted, README dropped)
  expected.safetensors (safetensors.numpy; __metadata__ "recipe" is a JSON object: model, lora config, lr,
  betas, eps, weight_decay, max_grad_norm, warmup, steps, router_aux_coef, sequences, pad):
    batch.{i}.tokens        I32 [T_i]   sequence i
    batch.{i}.target        U8  [T_i]   1 where transformers' label is the token (predicted from tokens < t), 0
                                        where it is -100 (position 0 and the prompt prefix)
    step0.loss / step0.ce / step0.aux   F64 [1]   float32 run (aux 0 when off)
    step0_f64.loss / .ce / .aux         F64 [1]   float64 run
    train.loss, train.ce, train.aux     F64 [10]  float32 run, before each step
    train.lr                            F64 [10]  the learning rate of each step
    train.grad_norm                     F64 [10]  clip_grad_norm_'s total norm (before clipping)
    train_f64.loss, .ce, .aux, .grad_norm  F64 [10]  float64 run
    train.factor_spread                 F64 [1]   max over the factors of max |f32 - f64| / max |f64| after the
                                                  10 steps (torch's own rounding of a trajectory)
    held_out.tokens                     I32 [T]
    held_out.logits                     F32 [T, V]  float32 peft model with trained_adapter/, eval mode
    held_out.logits_f64                 F64 [T, V]  float64 model with the same (float32) factors
    nf4_checksum.<weight name>          F64 [3]   the dequantized base weight W (flattened, FP32):
                                                  sum W, sum W * (1 + i mod 7), max |W|, in float64
  grads.safetensors       <peft key> F32   gradient of each factor after the first backward, float32 run, keyed
                                           by the adapter file's names (base_model.model.<module>.lora_A.weight)
  grads_f64.safetensors   <peft key> F64   the same, float64 run
  moelab_adapter/         (committed separately: an adapter trained by moelab's C++ LoraParams::save)
  moelab_expected.safetensors  (--check-moelab-adapter) held_out.tokens, held_out.logits F32 and
                               held_out.logits_f64 F64: transformers + peft (PeftModel.from_pretrained) with
                               moelab_adapter/ on the same dequantized base
"""

from __future__ import annotations

import os

os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # must precede `import torch` (see the docstring)

import copy
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF
import transformers
import peft
import bitsandbytes
import bitsandbytes.functional as BF
from bitsandbytes.backends.default.ops import _dequantize_4bit_impl
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import save_file as np_save_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import MODEL_DIR, ROOT, Float64Islands, use_float64_rope  # noqa: E402
from transformers import AutoModelForCausalLM, MistralForCausalLM, MixtralForCausalLM  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "train"
PEFT_VERSION = "0.21.2"
TRANSFORMERS_VERSION = "4.57.3"
BNB_VERSION = "0.49.2"
PAD = 0  # token id of the right padding (masked and -100; any id gives the same result)

OPTIM = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
MAX_GRAD_NORM = 1.0
WARMUP, STEPS = 2, 10

CASES = {
    # Top-2, GQA 4:1, every module moelab adapts, the router's load-balancing loss on (a coefficient far above
    # the config's 0.001, so its gradient is visible next to the cross-entropy's).
    "mixtral-4e-gqa-f32": {
        "model": "mixtral-4e-gqa-f32",
        "seed": 1511,
        "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"]),
        "router_aux_coef": 0.05,
        "lengths": [16, 13, 10],
        "prompt": [5, 3, 1],
        "held_out": 12,
    },
    # Top-1, sliding window 4 (shorter than every sequence), tied lm_head, rsLoRA, mixed targets, no aux loss.
    "mixtral-top1-swa": {
        "model": "mixtral-top1-swa",
        "seed": 1512,
        "lora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w2"]),
        "router_aux_coef": 0.0,
        "lengths": [14, 9, 11],
        "prompt": [4, 0, 2],
        "held_out": 12,
    },
    # The dense model (MistralForCausalLM: mlp.gate_proj/up_proj/down_proj instead of experts), GQA 2:1.
    "mistral-dense": {
        "model": "mistral-dense",
        "seed": 1513,
        "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "router_aux_coef": 0.0,
        "lengths": [15, 12, 8],
        "prompt": [3, 2, 0],
        "held_out": 12,
    },
}


def log(*a):
    print("[make_train_fixtures]", *a, flush=True)


# ----------------------------------------------------------------------------------------------------------
# 1. The NF4 base
# ----------------------------------------------------------------------------------------------------------
def nf4_weight_names(cfg) -> list[str]:
    """ModelConfig::nf4_weight_names() for a Mixtral config, in its order."""
    names = []
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        names += [p + f"self_attn.{x}.weight" for x in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if not is_moe(cfg):  # MistralForCausalLM's dense MLP: w1 = gate_proj, w3 = up_proj, w2 = down_proj
            names += [p + f"mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
            continue
        names.append(p + "block_sparse_moe.gate.weight")
        for e in range(cfg.num_local_experts):
            names += [p + f"block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2")]
    return names


def is_moe(cfg) -> bool:
    return cfg.model_type == "mixtral"


def nf4_round_trip(w: torch.Tensor, cuda_map: torch.Tensor) -> tuple[torch.Tensor, int]:
    """bitsandbytes' NF4 quantization (blocksize 64, double quantization) and its flat FP32 dequantization,
    with the CUDA 8-bit map. Returns the dequantized weight and how many blocks used 8-bit code 0."""
    assert w.dtype == torch.float32 and w.numel() % 2 == 0
    q, s = BF.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert s.nested and s.blocksize == 64 and s.state2.blocksize == 256

    def dequant(map8: torch.Tensor) -> torch.Tensor:
        st2 = copy.copy(s.state2)
        st2.code = map8
        absmax = BF.dequantize_blockwise(s.absmax, st2)
        absmax += s.offset
        return _dequantize_4bit_impl(q, absmax.float(), s.blocksize, "nf4", s.shape, torch.float32)

    code0 = int((s.absmax == 0).sum())
    ours = dequant(cuda_map)
    if code0 == 0:  # bitsandbytes' own state (its mutated map) gives the same values
        assert torch.equal(ours, dequant(s.state2.code))
    return ours.reshape(w.shape), code0


def checksum(w: torch.Tensor) -> np.ndarray:
    x = w.detach().reshape(-1).double()
    weights = 1 + torch.arange(x.numel(), dtype=torch.float64) % 7
    return np.array([x.sum().item(), (x * weights).sum().item(), x.abs().max().item()], dtype=np.float64)


def load_nf4_base(model_name: str, cuda_map: torch.Tensor):
    """The float checkpoint with every NF4 weight replaced by its round trip; float32, eager, training mode."""
    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR / model_name, dtype=torch.float32, attn_implementation="eager")
    assert type(m) in (MixtralForCausalLM, MistralForCausalLM), type(m)
    names = nf4_weight_names(m.config)
    params = dict(m.named_parameters())
    deq, code0, sums = {}, 0, {}
    for n in names:
        d, c = nf4_round_trip(params[n].detach().clone(), cuda_map)
        deq[n], code0 = d, code0 + c
    with torch.no_grad():
        for n in names:
            params[n].copy_(deq[n])
    digest = hashlib.sha256()
    for n in names:  # what is loaded is what bitsandbytes gave
        assert torch.equal(params[n].detach(), deq[n]), n
        sums[f"nf4_checksum.{n}"] = checksum(params[n])
        digest.update(params[n].detach().numpy().astype("<f4").tobytes())
    assert getattr(m.config, "router_jitter_noise", 0.0) == 0.0 and m.config.attention_dropout == 0.0
    return m, sums, {"nf4_weights": len(names), "code0_blocks": code0, "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------------------------------------
# 2-3. Adapter and batch
# ----------------------------------------------------------------------------------------------------------
def rewrite_adapter_dir(out: Path, model_name: str) -> None:
    (out / "README.md").unlink(missing_ok=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = f"tests/fixtures/models/{model_name}"
    if isinstance(cfg["target_modules"], list):  # a set in peft: its order changes from run to run
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def make_batch(spec: dict, vocab: int):
    g = torch.Generator().manual_seed(spec["seed"])
    seqs = []
    for T, p in zip(spec["lengths"], spec["prompt"]):
        tokens = torch.randint(3, vocab, (T,), generator=g)
        target = torch.ones(T, dtype=torch.uint8)
        target[: max(p, 1)] = 0  # position 0 is never a label; then the prompt prefix
        seqs.append((tokens, target))
    held = torch.randint(3, vocab, (spec["held_out"],), generator=g)
    return seqs, held


def padded(seqs):
    T = max(len(t) for t, _ in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (t, tg) in enumerate(seqs):
        ids[i, : len(t)], mask[i, : len(t)] = t, 1
        labels[i, : len(t)] = torch.where(tg.bool(), t, torch.full_like(t, -100))
    return ids, mask, labels


def peft_key(param_name: str) -> str:
    """Trainable parameter name -> the adapter file's key (peft drops the adapter name)."""
    assert ".default." in param_name, param_name
    return param_name.replace(".default.", ".")


# ----------------------------------------------------------------------------------------------------------
# 4. Losses
# ----------------------------------------------------------------------------------------------------------
def router_kwargs(coef: float) -> dict:
    """output_router_logits only where the loss uses them (MistralForCausalLM has no router)."""
    return {"output_router_logits": True} if coef > 0 else {}


def loss_f32(pm, batch, coef: float):
    """The padded batch through the peft model, with transformers' own loss; CE and aux split."""
    ids, mask, labels = batch
    out = pm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, **router_kwargs(coef))
    if coef > 0:
        cfg = pm.base_model.model.config
        aux = load_balancing_loss_func(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok, mask)
        assert torch.equal(aux, out.aux_loss)
        # transformers' CE: mean over the labels of the shifted logits (float32)
        ce = TF.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
        assert abs((ce + coef * aux).item() - out.loss.item()) <= 1e-6 * abs(out.loss.item()), (ce.item(), aux.item())
        return out.loss, (out.loss - coef * aux).item(), aux.item(), out
    return out.loss, out.loss.item(), 0.0, out


def aux_f64(router_logits: list[torch.Tensor], E: int, k: int) -> torch.Tensor:
    """load_balancing_loss_func without padding, evaluated in float64 (transformers' version casts the one-hot
    mask to float32): E * sum_{j<k, e} mean_tokens(onehot(topk_j) == e) * mean_tokens(softmax)_e, over all
    layers' tokens together."""
    g = torch.cat(router_logits, 0)
    p = torch.softmax(g, dim=-1)
    _, sel = torch.topk(p, k, dim=-1)
    tokens_per_expert = TF.one_hot(sel, E).double().mean(0)
    return (tokens_per_expert * p.mean(0)[None]).sum() * E


def loss_f64(pm64, seqs, coef: float):
    """Each sequence alone through the float64 model; CE summed over all targets / their count, aux over
    every real token of every layer."""
    cfg = pm64.base_model.model.config
    ce_sum, n, rl = 0, 0, [[] for _ in range(cfg.num_hidden_layers)]
    with Float64Islands():
        for tokens, target in seqs:
            out = pm64(input_ids=tokens[None], use_cache=False, **router_kwargs(coef))
            assert out.logits.dtype == torch.float64
            lp = torch.log_softmax(out.logits[0, :-1], dim=-1)
            t = target[1:].bool()
            ce_sum = ce_sum - lp[t].gather(1, tokens[1:][t][:, None]).sum()
            n += int(t.sum())
            if coef > 0:
                for l, r in enumerate(out.router_logits):
                    assert r.dtype == torch.float64
                    rl[l].append(r)
        ce = ce_sum / n
        aux = aux_f64([torch.cat(r, 0) for r in rl], cfg.num_local_experts, cfg.num_experts_per_tok) if coef > 0 else None
    loss = ce + coef * aux if coef > 0 else ce
    return loss, ce.item(), aux.item() if coef > 0 else 0.0


def to_f64(pm):
    pm64 = copy.deepcopy(pm).double()
    use_float64_rope(pm64.base_model.model)
    return pm64


def trainable(pm):
    return [(n, p) for n, p in pm.named_parameters() if p.requires_grad]


def grads(pm, dtype) -> dict:
    return {peft_key(n): p.grad.detach().numpy().astype(dtype) for n, p in trainable(pm)}


# ----------------------------------------------------------------------------------------------------------
# 5. Training
# ----------------------------------------------------------------------------------------------------------
def train(pm, loss_fn) -> dict:
    params = [p for _, p in trainable(pm)]
    opt = torch.optim.AdamW(params, foreach=False, **OPTIM)
    sched = transformers.get_cosine_schedule_with_warmup(opt, WARMUP, STEPS)
    rec = {k: [] for k in ("loss", "ce", "aux", "lr", "grad_norm")}
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss, ce, aux = loss_fn()
        loss.backward()
        rec["lr"].append(sched.get_last_lr()[0])
        rec["grad_norm"].append(torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_GRAD_NORM).item())
        opt.step()
        sched.step()
        rec["loss"].append(loss.item())
        rec["ce"].append(ce)
        rec["aux"].append(aux)
    return {k: np.array(v, dtype=np.float64) for k, v in rec.items()}


def held_out_logits(model_name: str, adapter_dir: Path, cuda_map, tokens):
    base, _, _ = load_nf4_base(model_name, cuda_map)
    m32 = PeftModel.from_pretrained(base, adapter_dir)
    m32.eval()
    m64 = to_f64(m32)
    with torch.no_grad():
        l32 = m32(input_ids=tokens[None], use_cache=False).logits[0]
        with Float64Islands():
            l64 = m64(input_ids=tokens[None], use_cache=False).logits[0]
    assert l64.dtype == torch.float64
    return l32.numpy().astype(np.float32), l64.numpy().astype(np.float64)


def rel_max(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def make_case(name: str, spec: dict, cuda_map) -> dict:
    out = OUT / name
    for sub in ("init_adapter", "trained_adapter"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    model_name, coef = spec["model"], spec["router_aux_coef"]
    base, sums, nf4_info = load_nf4_base(model_name, cuda_map)
    cfg = base.config
    if is_moe(cfg):
        base.router_aux_loss_coef = cfg.router_aux_loss_coef = coef  # MixtralForCausalLM keeps its own copy
    assert coef == 0 or is_moe(cfg)
    seqs, held = make_batch(spec, cfg.vocab_size)
    batch = padded(seqs)

    torch.manual_seed(spec["seed"])
    lcfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", init_lora_weights=False, **spec["lora"])
    pm = get_peft_model(base, lcfg)
    pm.train()
    pm.save_pretrained(out / "init_adapter")
    rewrite_adapter_dir(out / "init_adapter", model_name)
    assert all(p.abs().max() > 0 for _, p in trainable(pm)), "a zero factor tests nothing"

    # Right padding changes nothing for the real tokens: each sequence alone gives the same logits.
    with torch.no_grad():
        full = pm(input_ids=batch[0], attention_mask=batch[1], use_cache=False).logits
        pad_spread = 0.0
        for i, (t, _) in enumerate(seqs):
            alone = pm(input_ids=t[None], use_cache=False).logits[0]
            pad_spread = max(pad_spread, rel_max(full[i, : len(t)], alone))
    assert pad_spread < 1e-5, pad_spread

    # Step 0, float32 (the padded batch) and float64 (sequence by sequence).
    pm.zero_grad(set_to_none=True)
    loss, ce, aux, _ = loss_f32(pm, batch, coef)
    loss.backward()
    g32 = grads(pm, np.float32)
    step0 = {"loss": loss.item(), "ce": ce, "aux": aux}
    pm.zero_grad(set_to_none=True)

    pm64 = to_f64(pm)
    pm64.train()
    loss64, ce64, aux64 = loss_f64(pm64, seqs, coef)
    loss64.backward()
    g64 = grads(pm64, np.float64)
    assert g32.keys() == g64.keys()
    # The float32 unpadded path of the C++ side is the padded one here: check the loss agrees with float64.
    assert abs(step0["loss"] - loss64.item()) < 1e-5 * abs(loss64.item()), (step0["loss"], loss64.item())
    grad_spread = {k: rel_max(g32[k], g64[k]) for k in g32}

    # 10 steps, float32 and float64, from the same initial factors.
    pm64_train = to_f64(pm)
    pm64_train.train()
    rec32 = train(pm, lambda: loss_f32(pm, batch, coef)[:3])
    rec64 = train(pm64_train, lambda: loss_f64(pm64_train, seqs, coef))
    assert np.allclose(rec32["lr"], rec64["lr"], rtol=0, atol=0)
    factors64 = dict(trainable(pm64_train))
    factor_spread = max(rel_max(p.detach().numpy(), factors64[n].detach().numpy()) for n, p in trainable(pm))
    pm.save_pretrained(out / "trained_adapter")
    rewrite_adapter_dir(out / "trained_adapter", model_name)

    l32, l64 = held_out_logits(model_name, out / "trained_adapter", cuda_map, held)

    tensors = {}
    for i, (t, tg) in enumerate(seqs):
        tensors[f"batch.{i}.tokens"] = t.numpy().astype(np.int32)
        tensors[f"batch.{i}.target"] = tg.numpy().astype(np.uint8)
    for k, v in step0.items():
        tensors[f"step0.{k}"] = np.array([v], np.float64)
    for k, v in (("loss", loss64.item()), ("ce", ce64), ("aux", aux64)):
        tensors[f"step0_f64.{k}"] = np.array([v], np.float64)
    for k in ("loss", "ce", "aux", "lr", "grad_norm"):
        tensors[f"train.{k}"] = rec32[k]
    for k in ("loss", "ce", "aux", "grad_norm"):
        tensors[f"train_f64.{k}"] = rec64[k]
    tensors["train.factor_spread"] = np.array([factor_spread], np.float64)
    tensors["held_out.tokens"] = held.numpy().astype(np.int32)
    tensors["held_out.logits"] = l32
    tensors["held_out.logits_f64"] = l64
    tensors.update(sums)
    recipe = {"model": f"tests/fixtures/models/{model_name}", "lora": spec["lora"], **OPTIM,
              "max_grad_norm": MAX_GRAD_NORM, "warmup": WARMUP, "steps": STEPS, "router_aux_coef": coef,
              "sequences": len(seqs), "pad": PAD, "seed": spec["seed"]}
    np_save_file(tensors, str(out / "expected.safetensors"), metadata={"recipe": json.dumps(recipe)})
    np_save_file(g32, str(out / "grads.safetensors"))
    np_save_file(g64, str(out / "grads_f64.safetensors"))

    n_params = sum(p.numel() for _, p in trainable(pm))
    return {
        "model": model_name, "lora": spec["lora"], "coef": coef, "lengths": spec["lengths"], "prompt": spec["prompt"],
        "params": n_params, "tensors": len(g32), **nf4_info,
        "pad_spread": pad_spread,
        "loss_spread": abs(step0["loss"] - loss64.item()) / abs(loss64.item()),
        "ce_spread": abs(ce - ce64) / abs(ce64),
        "aux_spread": abs(aux - aux64) / abs(aux64) if coef > 0 else 0.0,
        "grad_spread_max": max(grad_spread.values()),
        "grad_spread_worst": max(grad_spread, key=grad_spread.get),
        "train_loss_spread": float(np.max(np.abs(rec32["loss"] - rec64["loss"]) / np.abs(rec64["loss"]))),
        "factor_spread": factor_spread,
        "train_norm_spread": float(np.max(np.abs(rec32["grad_norm"] - rec64["grad_norm"]) / rec64["grad_norm"])),
        "loss_first_last": (rec32["loss"][0], rec32["loss"][-1]),
        "grad_norm_range": (float(rec32["grad_norm"].min()), float(rec32["grad_norm"].max())),
        "logits_spread": rel_max(l32, l64),
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }


def check_moelab_adapters(cuda_map) -> None:
    for name, spec in CASES.items():
        out = OUT / name
        adir = out / "moelab_adapter"
        if not (adir / "adapter_config.json").exists():
            log(f"{name}: no moelab_adapter/, skipped")
            continue
        _, held = make_batch(spec, json.loads((MODEL_DIR / spec["model"] / "config.json").read_text())["vocab_size"])
        l32, l64 = held_out_logits(spec["model"], adir, cuda_map, held)
        np_save_file({"held_out.tokens": held.numpy().astype(np.int32), "held_out.logits": l32,
                      "held_out.logits_f64": l64}, str(out / "moelab_expected.safetensors"))
        log(f"{name}: moelab_adapter loaded by peft; f32 vs f64 logits {rel_max(l32, l64):.1e}")


def write_readme(info: dict, nf4_map_note: str) -> None:
    lines = [
        "# tests/fixtures/train",
        "",
        "Generated by `scripts/make_train_fixtures.py` (run `.venv/bin/python scripts/make_train_fixtures.py` from the",
        "repository root; about half a minute on one CPU thread). QLoRA training by transformers + peft + torch on the",
        "fixture models' NF4 round trip, recorded for `tests/test_train_parity.cpp`; the script's docstring lists every",
        "file and tensor. `--check-moelab-adapter` records peft's logits for the adapters moelab trained",
        "(`<case>/moelab_adapter/` -> `<case>/moelab_expected.safetensors`).",
        f"Generated with: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__},",
        f"bitsandbytes {bitsandbytes.__version__}; `ATEN_CPU_CAPABILITY=avx2`, one torch thread.",
        "",
        f"Recipe (every case): AdamW lr {OPTIM['lr']}, betas {OPTIM['betas']}, eps {OPTIM['eps']}, weight decay "
        f"{OPTIM['weight_decay']} (foreach=False); clip_grad_norm_ {MAX_GRAD_NORM}; cosine schedule with {WARMUP} "
        f"warmup steps of {STEPS}; the same batch every step; lora_dropout 0; init_lora_weights=False after "
        "torch.manual_seed(seed).",
        "",
        "| case | model | LoRA | aux coef | sequences (prompt tokens) | trainable | NF4 base |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in info.items():
        lora = ", ".join(f"{k}={json.dumps(v)}" for k, v in c["lora"].items())
        seqs = ", ".join(f"{T} ({p})" for T, p in zip(c["lengths"], c["prompt"]))
        lines.append(f"| `{name}` | `{c['model']}` | {lora} | {c['coef']} | {seqs} | {c['params']} in {c['tensors']} "
                     f"tensors | {c['nf4_weights']} weights, {c['code0_blocks']} blocks with 8-bit code 0, sha256 "
                     f"`{c['sha256'][:16]}…` |")
    lines += [
        "",
        "## Measured (float32 vs float64, torch itself)",
        "",
        "Relative errors: |f32 - f64| / |f64| for scalars; per tensor max |f32 - f64| / max |f64| for gradients and",
        "logits. These are the yardsticks of the C++ test's FP32 tolerances.",
        "",
        "| case | padded vs alone (logits) | step-0 loss | CE | aux | gradients (worst tensor) | 10-step losses | grad norms | trained factors | held-out logits | loss step 0 -> 9 | grad norm range | bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in info.items():
        lines.append(
            f"| `{name}` | {c['pad_spread']:.1e} | {c['loss_spread']:.1e} | {c['ce_spread']:.1e} | {c['aux_spread']:.1e} | "
            f"{c['grad_spread_max']:.1e} (`{c['grad_spread_worst'].replace('base_model.model.', '')}`) | "
            f"{c['train_loss_spread']:.1e} | {c['train_norm_spread']:.1e} | {c['factor_spread']:.1e} | {c['logits_spread']:.1e} | "
            f"{c['loss_first_last'][0]:.4f} -> {c['loss_first_last'][1]:.4f} | "
            f"{c['grad_norm_range'][0]:.3f} .. {c['grad_norm_range'][1]:.3f} | {c['bytes']:,} |")
    lines += [
        "",
        nf4_map_note,
        "",
        "## moelab_adapter/ (the other direction)",
        "",
        "`<case>/moelab_adapter/` is an adapter trained by moelab: `tests/test_train_parity.cpp`'s run of the same",
        "recipe from `init_adapter/` (LoraModel<float> on moelab's own NF4 base, train::AdamW, clip_grad_norm, the",
        "cosine LrSchedule), saved by `LoraParams::save`. To regenerate it, run the test with",
        "`MOELAB_WRITE_MOELAB_ADAPTER=DIR` (it writes `DIR/<case>/`), copy each to `<case>/moelab_adapter/`, then",
        "`scripts/make_train_fixtures.py --check-moelab-adapter`: peft loads it (`PeftModel.from_pretrained` on the",
        "same NF4 base) and records transformers' held-out logits in `<case>/moelab_expected.safetensors`, which the",
        "test compares with moelab's reference engine. The test also checks that a fresh run trains the committed",
        "factors (within twice 10x the largest `train.factor_spread` of the cases).",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))


def main() -> None:
    found = (peft.__version__, transformers.__version__, bitsandbytes.__version__)
    if found != (PEFT_VERSION, TRANSFORMERS_VERSION, BNB_VERSION):
        sys.exit(f"needs peft {PEFT_VERSION}, transformers {TRANSFORMERS_VERSION}, bitsandbytes {BNB_VERSION} "
                 f"(scripts/setup.sh --dev); found {found}")
    torch.set_num_threads(1)  # the double-quantization offset (torch.mean) and sums depend on it
    transformers.logging.set_verbosity_error()
    cuda_map = BF.create_dynamic_map()  # before any quantization mutates bitsandbytes' cached map
    assert cuda_map[0].item() != -1.0
    if "--check-moelab-adapter" in sys.argv[1:]:
        check_moelab_adapters(cuda_map)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, spec in CASES.items():
        info[name] = make_case(name, spec, cuda_map)
        log(name, {k: v for k, v in info[name].items() if k not in ("lora",)})
    write_readme(info, "The 8-bit map of the double quantization is the fresh `create_dynamic_map()` (CUDA's and "
                       "moelab's); bitsandbytes' CPU quantizer writes -1.0 into entry 0 of its cached copy, which "
                       "changes only blocks whose 8-bit code is 0 (counted above).")
    check_moelab_adapters(cuda_map)
    total = sum(p.stat().st_size for name in CASES for p in (OUT / name).rglob("*") if p.is_file())
    log(f"done: {total / 1024:.0f} KiB in {len(CASES)} cases under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
