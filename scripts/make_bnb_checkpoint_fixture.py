#!/usr/bin/env python3
"""Write tests/fixtures/models/mixtral-4e-bnb-nf4/: a Mixtral checkpoint that transformers + bitsandbytes
quantized and saved themselves, and what transformers computes with it.

Run from the repository root (CPU only, no GPU, no network, a few seconds):

    .venv/bin/python scripts/make_bnb_checkpoint_fixture.py

Pinned: transformers 4.57.3, bitsandbytes 0.49.2, torch 2.9.1 (the script refuses other versions).
torch's CPU kernels are pinned to AVX2 (ATEN_CPU_CAPABILITY=avx2) and one thread, as in
scripts/make_nf4_fixtures.py: bitsandbytes' 8-bit map (torch.linspace) and double-quantization offset
(torch.mean) depend on them in the last bits.

What and why
------------
moelab's cpu-nf4 engine reads pre-quantized checkpoints in bitsandbytes' serialized form. The other NF4
fixtures are moelab's own writer checked against bitsandbytes tensor by tensor; this one is a genuine
transformers file, so the test (tests/test_bnb_checkpoint.cpp) shows that moelab opens what transformers
writes, not only what moelab writes.

  1. Load tests/fixtures/models/mixtral-4e-gqa-f32 with MixtralForCausalLM.from_pretrained(...,
     quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
     bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32), device_map="cpu").
     transformers replaces every nn.Linear except lm_head with bnb Linear4bit (attention projections,
     the router gate, every expert's w1/w2/w3); embeddings, norms and lm_head stay float32.
  2. save_pretrained(safe_serialization=True) into the fixture folder; tokenizer.model copied.
  3. Run the quantized model on the CPU (float32 compute, bitsandbytes' generic CPU path: every
     Linear4bit's support_avx512bf16_for_cpu set False, see main()) on the 12 tokens of
     mixtral-4e-gqa-f32/expected.safetensors and save expected.safetensors:
       tokens  I32 [12]
       logits  F32 [12, vocab]   transformers' logits with the 4-bit model
       dequant.<weight name>  F32 [out, in]   bitsandbytes' dequantize_4bit of the 4-bit weights of every
                                              attention projection, router gate and expert 0 (each layer)
"""

import os

os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # must precede `import torch`

import shutil
import sys
from pathlib import Path

import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig, MixtralForCausalLM

PINNED = {"torch": "2.9.1", "transformers": "4.57.3", "bitsandbytes": "0.49.2"}


def main() -> int:
    found = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
             "bitsandbytes": bnb.__version__}
    if found != PINNED:
        print(f"refusing: need {PINNED}, found {found}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    torch.manual_seed(0)

    root = Path(__file__).resolve().parent.parent
    src = root / "tests/fixtures/models/mixtral-4e-gqa-f32"
    dst = root / "tests/fixtures/models/mixtral-4e-bnb-nf4"

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    model = MixtralForCausalLM.from_pretrained(src, quantization_config=qcfg, device_map="cpu",
                                               dtype=torch.float32)
    model.eval()

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    model.save_pretrained(dst, safe_serialization=True)
    shutil.copyfile(src / "tokenizer.model", dst / "tokenizer.model")

    # bitsandbytes 0.49.2's Linear4bit.forward, on a CPU with AVX512-BF16, first repacks the weight for
    # its CPU kernel (_convert_weight_packed_for_cpu: absmax rounded to bfloat16, output features in
    # blocks of 32). It asserts N % 32 == 0, which fails for this model's k_proj/v_proj (N = 16), and it
    # would make the logits depend on the CPU. Turn it off so every CPU takes the generic path
    # (MatMul4Bit: dequantize_4bit in float32, then a float32 matmul). save_pretrained ran first anyway.
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False

    tokens = load_file(src / "expected.safetensors")["tokens"].to(torch.int64).reshape(-1)
    with torch.no_grad():
        logits = model(tokens[None, :]).logits[0].to(torch.float32).contiguous()

    out = {"tokens": tokens.to(torch.int32).contiguous(), "logits": logits}
    n4 = 0
    for name, mod in model.named_modules():
        # Keep the fixture under 1 MB: every attention projection and router, and expert 0 of each layer.
        if isinstance(mod, bnb.nn.Linear4bit) and (".experts." not in name or ".experts.0." in name):
            w = mod.weight
            deq = F.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
            out[f"dequant.{name}.weight"] = deq.contiguous()
            n4 += 1
    meta = {k: v for k, v in found.items()}
    meta["dequantized_weights"] = str(n4)
    save_file(out, dst / "expected.safetensors", metadata=meta)

    ref = load_file(src / "expected.safetensors")
    if "logits" in ref:
        r = ref["logits"].to(torch.float64)
        print("rel L2 vs unquantized expected logits:",
              float((logits.double() - r).norm() / r.norm()))
    print(f"{n4} dequantized weights saved; wrote {dst}")
    for p in sorted(dst.iterdir()):
        print(f"  {p.name}: {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
