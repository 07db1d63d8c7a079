#!/usr/bin/env python3
"""Write a Mixtral-8x7B-shaped checkpoint with random BF16 weights (for scripts/bench_vs_llamacpp.sh).

The real Mixtral-8x7B geometry (hidden 4096, ffn 14336, 32 heads, 8 KV heads, head_dim 128, 8 experts,
top-2, vocab 32000, rope_theta 1e6, rms eps 1e-5) with --layers N decoder layers, HF MixtralForCausalLM
tensor names, config.json, model.safetensors.index.json and a tokenizer.model copied from --tokenizer.

Weights: linear layers and embeddings are normal * 0.02 (router too), norms are 1. Each tensor is a
contiguous run of a pool of 2^26 i.i.d. normal BF16 values starting at a per-tensor random offset
(wrapping), so generation costs no CPU time and every element within a tensor up to 64 Mi elements is
a distinct draw. Shards (one for the embedding/head/final norm, one per layer) are written tensor by
tensor in the safetensors layout by hand, so memory stays at the pool plus one tensor (~250 MB).

Uses numpy only (the project's light-tier .venv has it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time

import numpy as np

HIDDEN = 4096
FFN = 14336
HEADS = 32
KV_HEADS = 8
HEAD_DIM = 128
EXPERTS = 8
TOP_K = 2
VOCAB = 32000
POOL = 1 << 26
SCALE = 0.02


def config(layers: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": HEADS,
        "num_experts_per_tok": TOP_K,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV_HEADS,
        "num_local_experts": EXPERTS,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.6",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def shard_plan(layers: int) -> list[tuple[str, list[tuple[str, tuple[int, ...], str]]]]:
    """[(shard file name, [(tensor name, shape, kind)])]; kind is 'w' (random) or 'one' (norm)."""
    n_shards = layers + 1
    plan = []
    head = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "w"),
            ("model.norm.weight", (HIDDEN,), "one"),
            ("lm_head.weight", (VOCAB, HIDDEN), "w")]
    plan.append((f"model-00001-of-{n_shards:05d}.safetensors", head))
    for i in range(layers):
        p = f"model.layers.{i}."
        t = [(p + "input_layernorm.weight", (HIDDEN,), "one"),
             (p + "post_attention_layernorm.weight", (HIDDEN,), "one"),
             (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), "w"),
             (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "w"),
             (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "w"),
             (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), "w"),
             (p + "block_sparse_moe.gate.weight", (EXPERTS, HIDDEN), "w")]
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            t += [(q + "w1.weight", (FFN, HIDDEN), "w"),
                  (q + "w2.weight", (HIDDEN, FFN), "w"),
                  (q + "w3.weight", (FFN, HIDDEN), "w")]
        plan.append((f"model-{i + 2:05d}-of-{n_shards:05d}.safetensors", t))
    return plan


def bf16_pool(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(POOL, dtype=np.float32) * np.float32(SCALE)
    u = x.view(np.uint32)
    # Round to nearest even, then keep the high half: BF16 bits.
    u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return u.astype(np.uint16)


ONE_BF16 = np.uint16(0x3F80)


def write_shard(path: str, tensors, pool: np.ndarray, rng: np.random.Generator) -> int:
    header = {}
    offset = 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path + ".tmp.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, kind in tensors:
            n = int(np.prod(shape))
            if kind == "one":
                np.full(n, ONE_BF16, dtype=np.uint16).tofile(f)
                continue
            start = int(rng.integers(0, POOL))
            left = n
            while left > 0:
                take = min(left, POOL - start)
                pool[start:start + take].tofile(f)
                left -= take
                start = 0
    os.replace(tmp, path)
    return offset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokenizer", required=True, help="sentencepiece tokenizer.model to copy")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.layers < 1:
        ap.error("--layers must be >= 1")
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    pool = bf16_pool(rng)
    weight_map = {}
    total = 0
    plan = shard_plan(a.layers)
    for k, (fname, tensors) in enumerate(plan):
        total += write_shard(os.path.join(a.out, fname), tensors, pool, rng)
        for name, _, _ in tensors:
            weight_map[name] = fname
        dt = time.time() - t0
        print(f"  shard {k + 1}/{len(plan)} {fname}: {total / 1e9:.2f} GB written, {dt:.0f} s, "
              f"{total / 1e6 / max(dt, 1e-9):.0f} MB/s", flush=True)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config(a.layers), f, indent=2)
    # Mixtral's own generation/tokenizer settings, so converters need nothing from a hub.
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "legacy": True, "model_max_length": 1000000000000000019884624838656,
                   "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False}, f, indent=2)
    shutil.copyfile(a.tokenizer, os.path.join(a.out, "tokenizer.model"))
    print(f"  checkpoint: {a.out} ({a.layers} layers, {total / 1e9:.2f} GB BF16)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
