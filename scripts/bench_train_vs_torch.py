#!/usr/bin/env python3
"""The same LoRA training steps in transformers + peft on the CPU, for a side-by-side with `moelab finetune`.

scripts/bench_train.sh times moelab on two workloads; this times what a user would otherwise run on a CPU:
transformers' MixtralForCausalLM in float32 (bitsandbytes' 4-bit layers need a GPU, so the frozen base here
is float32: the products are the same shapes, without moelab's dequantization) with peft's LoRA (r=8,
alpha=16, dropout 0.05 on q/k/v/o: moelab finetune's defaults), torch.optim.AdamW at 2e-4, one optimizer step
per batch, each sequence on its own (no padding), the loss the mean over the batch's target tokens. With
--padded-batch the batch's sequences go through as one padded batch instead, as trl's SFTTrainer collates
them by default (right padding to the longest, attention mask, labels -100 on the padding): one product
per weight per batch, as moelab computes since 8b08e04 (moelab stacks the sequences without padding).

  bundled          models/default (its own weights), batches of 8 corpus lines cut to 128 tokens (BOS + text
                   + EOS, sentencepiece), as `bench_train.sh`'s bundled run (20 steps)
  mixtral-shaped   the Mixtral-8x7B shapes with --layers layers, random float32 weights (the values do not
                   change the work), batches of 2 sequences of 64 random tokens (2 steps)

Prints tokens/s per step and overall, the peak resident memory, torch's threads and the CPU's ISA. Heavy: needs torch, transformers and
peft (.bench-cache/venv, or scripts/setup.sh --dev); the Mixtral shape holds ~6.3 GB of float32 a layer.
Measure only at a 1-minute load average below 1.5 (the script refuses otherwise unless --force).

  .bench-cache/venv/bin/python scripts/bench_train_vs_torch.py bundled [--threads 2]
  .bench-cache/venv/bin/python scripts/bench_train_vs_torch.py mixtral-shaped [--layers 2] [--threads 2]
  (either with --padded-batch)
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_avg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_isa() -> str:
    flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "").split()
    have = [f for f in ("avx512f", "avx512_vnni", "avx2", "fma") if f in flags]
    return "+".join(have) or "x86-64 baseline"


def bundled_batches(steps: int, batch: int, seq: int):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ROOT / "models/default/tokenizer.model"))
    seqs = []
    with gzip.open(ROOT / "models/default/corpus/train.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if len(seqs) == steps * batch:
                break
            text = json.loads(line)["text"]
            seqs.append(([sp.bos_id()] + sp.encode(text) + [sp.eos_id()])[:seq])
    return [seqs[i * batch:(i + 1) * batch] for i in range(steps)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["bundled", "mixtral-shaped"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=0, help="default: 20 bundled, 2 mixtral-shaped")
    ap.add_argument("--batch", type=int, default=0, help="sequences a step; default: 8 bundled, 2 mixtral-shaped")
    ap.add_argument("--force", action="store_true", help="run at load >= 1.5 (figures marked NOT VALID)")
    ap.add_argument("--padded-batch", action="store_true", help="one padded forward per batch (trl's default collation)")
    a = ap.parse_args()
    load = load_avg()
    if load >= 1.5 and not a.force:
        print(f"bench_train_vs_torch: load average {load} >= 1.5: figures would not be valid (--force to run anyway)",
              file=sys.stderr)
        return 1

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.workload == "bundled":
        model = MixtralForCausalLM.from_pretrained(str(ROOT / "models/default"), dtype=torch.float32)
        steps = a.steps or 20
        batches = bundled_batches(steps, a.batch or 8, 128)
    else:
        cfg = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
                            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                            vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                            sliding_window=None, tie_word_embeddings=False)
        t0 = time.time()
        model = MixtralForCausalLM(cfg).to(torch.float32)
        print(f"made the model in {time.time() - t0:.0f} s", file=sys.stderr)
        steps = a.steps or 2
        gen = torch.Generator().manual_seed(1)
        batches = [[torch.randint(3, 32000, (64,), generator=gen).tolist() for _ in range(a.batch or 2)]
                   for _ in range(steps)]
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    total_tokens, total_s = 0, 0.0
    for i, batch in enumerate(batches):
        t0 = time.time()
        targets = sum(len(s) - 1 for s in batch)
        if a.padded_batch:
            width = max(len(s) for s in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
                labels[r, :len(s)] = torch.tensor(s)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100, reduction="sum") / targets
            loss.backward()
        else:
            for s in batch:
                ids = torch.tensor([s])
                logits = model(input_ids=ids).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum") / targets
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        tokens = sum(len(s) for s in batch)
        total_tokens += tokens
        total_s += dt
        print(f"step {i + 1}/{steps}: {tokens} tokens in {dt:.2f} s ({tokens / dt:.1f} tokens/s)", file=sys.stderr)
    print(f"transformers {__import__('transformers').__version__} + peft {__import__('peft').__version__}, torch "
          f"{torch.__version__}, {a.workload}{', padded batches' if a.padded_batch else ''}, {steps} steps, {total_tokens} tokens in {total_s:.2f} s: "
          f"{total_tokens / total_s:.1f} tokens/s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; "
          f"threads {torch.get_num_threads()}, CPU {cpu_isa()}, "
          f"load before {load}{' NOT VALID' if load >= 1.5 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
