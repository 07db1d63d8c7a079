#!/usr/bin/env python3
"""Regenerate the LoRA adapter fixtures under tests/fixtures/lora/ (peft + transformers as the oracle).

Run from the repository root (CPU only, no network, a few seconds):

    .venv/bin/python scripts/make_lora_fixtures.py

Needs the --dev Python tier of scripts/setup.sh (torch 2.9.1, transformers 4.57.3, peft 0.21.2; the script
refuses other peft / transformers versions, since the adapter format and the module matching are theirs).
It reads the fixture models of scripts/make_fixtures.py (tests/fixtures/models/) and writes nothing there.

What and why
------------
moelab reads peft LoRA adapters (core/lora.cpp) and applies them unmerged in its engines
(y = W x + scale * B (A x)) and merged (moelab merge: W + scale * B A). This script makes small adapters with
peft itself (LoraConfig + get_peft_model, then save_pretrained) on the fixture models, and records what
transformers + peft compute with them, so the C++ tests need no Python:

  <case>/adapter_config.json         as peft wrote it (base_model_name_or_path rewritten to the
                                     repository-relative model folder, a list target_modules sorted, and
                                     peft's README.md model card dropped: none of that changes what is read)
  <case>/adapter_model.safetensors   as peft wrote it (peft's key names: base_model.model.<module>.lora_A.weight)
  <case>/expected.safetensors        tokens I32 [12] (the model's expected.safetensors prompt), and with the
                                     adapter, transformers eager attention, no cache:
                                       logits F32 [12, V]          float32, unmerged (peft's lora.Linear)
                                       logits_f64 F64 [12, V]      float64 evaluation of the same math
                                       logits_merged F32 [12, V]   float32, after merge_and_unload()
                                       layers.{i}.hidden F32 [12, H], layers.{i}.router_logits F32 [12, E],
                                       layers.{i}.experts I32 [12, k]   (float32, unmerged)

peft initializes lora_B to zero (an adapter that changes nothing); these use init_lora_weights=False after
torch.manual_seed(seed), so both factors hold nn.Linear's seeded default (Kaiming-uniform) values and the
adapter changes the logits. The cases cover every module moelab adapts (attention q/k/v/o, the router gate,
every expert's w1/w2/w3), a list and a regex target_modules, rank_pattern / alpha_pattern, and rsLoRA.
The float64 run uses make_fixtures.py's Float64Islands and use_float64_rope (transformers' float32 islands
moved to float64), so logits_f64 is a true float64 evaluation; the LoRA layers run in float64 too.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
import peft
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import MODEL_DIR, ROOT, SEQ_LEN, Float64Islands, run_hooked, routing, use_float64_rope  # noqa: E402
from transformers import MixtralForCausalLM  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "lora"
PEFT_VERSION = "0.21.2"
TRANSFORMERS_VERSION = "4.57.3"

CASES = {
    # Every adaptable module by name; one rank and one alpha by pattern (peft's get_pattern_key).
    "mixtral-4e-gqa-f32-r4": {
        "model": "mixtral-4e-gqa-f32",
        "seed": 1501,
        "config": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"],
                       rank_pattern={"w2": 2}, alpha_pattern={"gate": 3}),
    },
    # A regex target_modules (fullmatch over module names), rsLoRA, a tied lm_head and a sliding window.
    "mixtral-top1-swa-rslora": {
        "model": "mixtral-top1-swa",
        "seed": 1502,
        "config": dict(r=4, lora_alpha=6, use_rslora=True,
                       target_modules=r".*\.(self_attn\.(q|k|v|o)_proj|block_sparse_moe\.(gate|experts\.\d+\.w[123]))"),
    },
}


def log(*a):
    print("[make_lora_fixtures]", *a, flush=True)


def load(model: str, dtype=torch.float32):
    m = MixtralForCausalLM.from_pretrained(MODEL_DIR / model, dtype=dtype, attn_implementation="eager")
    m.eval()
    return m


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_case(name: str, spec: dict) -> dict:
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    model_name = spec["model"]
    expected = safe_open(str(MODEL_DIR / model_name / "expected.safetensors"), "pt")
    tokens = expected.get_tensor("tokens").long()
    assert tokens.shape == (SEQ_LEN,)
    base_logits = expected.get_tensor("logits")

    # The adapter, made and saved by peft.
    torch.manual_seed(spec["seed"])
    config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", init_lora_weights=False, **spec["config"])
    pm = get_peft_model(load(model_name), config)
    pm.eval()
    adapted = sorted(n for n, mod in pm.base_model.model.named_modules() if hasattr(mod, "lora_A") and len(mod.lora_A))
    made = run_hooked(pm.base_model.model, tokens, True)
    pm.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors (+ README.md, dropped)
    (out / "README.md").unlink(missing_ok=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = f"tests/fixtures/models/{model_name}"
    if isinstance(cfg["target_modules"], list):  # a set in peft: its order changes from run to run
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")

    # As a user gets it: the saved adapter loaded onto a fresh base.
    m32 = PeftModel.from_pretrained(load(model_name), out)
    m32.eval()
    c32 = run_hooked(m32.base_model.model, tokens, True)
    assert torch.equal(c32["logits"], made["logits"]), "the saved adapter does not reproduce the logits"
    m64 = PeftModel.from_pretrained(load(model_name).double(), out).double()
    m64.eval()
    use_float64_rope(m64.base_model.model)
    with Float64Islands():
        c64 = run_hooked(m64.base_model.model, tokens, True)
    assert c64["logits"].dtype == torch.float64
    merged = m32.merge_and_unload()
    with torch.no_grad():
        logits_merged = merged(input_ids=tokens[None, :], use_cache=False).logits[0].detach().clone()

    mcfg = merged.config
    k, L = mcfg.num_experts_per_tok, mcfg.num_hidden_layers
    tensors = {"tokens": tokens.numpy().astype(np.int32),
               "logits": c32["logits"].numpy().astype(np.float32),
               "logits_f64": c64["logits"].numpy().astype(np.float64),
               "logits_merged": logits_merged.numpy().astype(np.float32)}
    margins, experts_changed = [], []
    for i in range(L):
        tensors[f"layers.{i}.hidden"] = c32[f"layers.{i}.hidden"].numpy().astype(np.float32)
        rl = c32[f"layers.{i}.router_logits"]
        sel, _, margin = routing(rl, k)
        sel64, _, _ = routing(c64[f"layers.{i}.router_logits"], k)
        assert torch.equal(sel, sel64), f"layer {i}: float32 and float64 choose different experts"
        tensors[f"layers.{i}.router_logits"] = rl.numpy().astype(np.float32)
        tensors[f"layers.{i}.experts"] = sel.numpy().astype(np.int32)
        margins.append(margin)
        base_sel = expected.get_tensor(f"layers.{i}.experts")
        experts_changed.append(int((torch.sort(sel, -1).values != torch.sort(base_sel, -1).values).any(-1).sum()))
    np_save_file(tensors, str(out / "expected.safetensors"))

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = sorted({str(f.get_tensor(key).dtype) for key in keys})
    return {
        "model": model_name,
        "config": {key: cfg[key] for key in ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern")},
        "adapted_modules": len(adapted),
        "adapted_kinds": sorted({n.rsplit(".", 1)[1] for n in adapted}),
        "tensors": len(keys),
        "dtypes": dtypes,
        "adapter_effect": rel_l2(c32["logits"], base_logits),
        "f32_vs_f64": rel_l2(c32["logits"], c64["logits"]),
        "f32_vs_f64_maxabs": (c32["logits"].double() - c64["logits"]).abs().max().item(),
        "merged_vs_unmerged": rel_l2(logits_merged, c32["logits"]),
        "merged_vs_f64": rel_l2(logits_merged, c64["logits"]),
        "route_margin_min": margins,
        "tokens_with_other_experts": experts_changed,
        "bytes": sum(p.stat().st_size for p in out.iterdir()),
    }


def write_readme(info: dict) -> None:
    lines = [
        "# tests/fixtures/lora",
        "",
        "Generated by `scripts/make_lora_fixtures.py` (run `.venv/bin/python scripts/make_lora_fixtures.py` from the",
        "repository root; it rewrites every folder here). peft LoRA adapters on the fixture models, saved by peft's",
        "`save_pretrained`, with what transformers + peft compute with them (see the script's docstring for every key).",
        f"Generated with: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}. CPU only,",
        "one torch thread.",
        "",
        "Each adapter was made with `LoraConfig(task_type=\"CAUSAL_LM\", init_lora_weights=False, ...)` after",
        "`torch.manual_seed(seed)`: lora_A and lora_B hold nn.Linear's default (Kaiming-uniform) values, so the adapter",
        "changes the logits (peft's default init sets lora_B to zero). `adapter_config.json` is peft's, with",
        "`base_model_name_or_path` rewritten to the repository-relative model folder and a list `target_modules` sorted",
        "(peft keeps it as a set, whose order changes from run to run).",
        "",
        "| case | model | config | adapted modules | tensors |",
        "|---|---|---|---|---|",
    ]
    for name, c in info.items():
        cfg = ", ".join(f"{k}={json.dumps(v)}" for k, v in c["config"].items() if v not in (None, {}, False))
        lines.append(f"| `{name}` | `{c['model']}` | {cfg} | {c['adapted_modules']} ({', '.join(c['adapted_kinds'])}) | "
                     f"{c['tensors']} ({', '.join(c['dtypes'])}), {c['bytes'] / 1024:.0f} KiB in all |")
    lines += [
        "",
        "## Measured",
        "",
        "| case | logits with vs without adapter (rel L2) | f32 vs f64 (rel L2, max abs) | merged vs unmerged f32 | merged vs f64 | min top-k routing margin | tokens whose experts the adapter changed (per layer) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in info.items():
        lines.append(f"| `{name}` | {c['adapter_effect']:.3f} | {c['f32_vs_f64']:.1e}, {c['f32_vs_f64_maxabs']:.1e} | "
                     f"{c['merged_vs_unmerged']:.1e} | {c['merged_vs_f64']:.1e} | "
                     f"{', '.join(f'{m:.4f}' for m in c['route_margin_min'])} | "
                     f"{', '.join(str(n) for n in c['tokens_with_other_experts'])} of {SEQ_LEN} |")
    lines += [
        "",
        "The float32 oracle carries its own rounding (the f32 vs f64 column): an FP32 implementation is compared with",
        "`logits_f64`, or with `logits` at a tolerance a few times that column; the float64 reference (`ref-f64`) with",
        "`logits_f64` to ~1e-10. The routing margins are far above FP32 rounding, so the chosen experts must match.",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))


def main() -> None:
    if peft.__version__ != PEFT_VERSION or transformers.__version__ != TRANSFORMERS_VERSION:
        sys.exit(f"needs peft {PEFT_VERSION} and transformers {TRANSFORMERS_VERSION} (scripts/setup.sh --dev); "
                 f"found peft {peft.__version__}, transformers {transformers.__version__}")
    torch.set_num_threads(1)  # deterministic summation order on CPU
    transformers.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, spec in CASES.items():
        info[name] = make_case(name, spec)
        log(name, {k: v for k, v in info[name].items() if k != "config"})
    write_readme(info)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    log(f"done: {total / 1024:.0f} KiB under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
