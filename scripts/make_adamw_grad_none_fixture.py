#!/usr/bin/env python3
"""Writes tests/fixtures/train/adamw/grad_none.{safetensors,json}: torch.optim.AdamW and clip_grad_norm_ when
some parameters have no gradient on some steps (p.grad is None), as the LoRA factors of a Mixtral expert that
no token was routed to in a step have in transformers (its MoE block runs only the experts it routes to).
torch then skips the parameter: no weight decay, no moment update, its own step count unchanged; and
clip_grad_norm_ leaves it out. tests/test_train_loop.cpp (AdamWTorch.TensorsWithoutAGradientAreSkippedAsTorch)
checks moelab's AdamW against it. Run with torch: .bench-cache/venv/bin/python scripts/make_adamw_grad_none_fixture.py

grad_none.safetensors (float32): param.<i> the initial values; grad.<s>.<i> the gradient at step s (absent
  when None); after.<s>.<i> the values after step s; clip.total.<s> clip_grad_norm_'s total at step s.
grad_none.json: hyper-parameters, learning rates, which (step, tensor) had no gradient, torch's version.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

from adamw_fixture_setup import HYPER, initial_tensors, torch_adamw

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "train", "adamw")
STEPS = 5
NONE = {(1, 1), (3, 1), (0, 2), (1, 2)}  # (step, tensor) without a gradient; tensor 2's first step is step 2
CLIP = 0.05


def main():
    g = torch.Generator().manual_seed(16)
    shapes = [(4, 8), (8, 4), (5,)]
    tensors = {}
    params = initial_tensors(g, shapes, tensors)
    hp = HYPER
    lrs = [1e-3 * f for f in (0.5, 1.0, 1.0, 0.8, 0.3)]
    ps, opt = torch_adamw(params, lrs[0])
    for s in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        opt.zero_grad(set_to_none=True)
        for i, p in enumerate(ps):
            if (s, i) in NONE:
                continue
            grad = torch.randn(p.shape, generator=g) * 0.1
            tensors[f"grad.{s}.{i}"] = grad.clone()
            p.grad = grad.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, CLIP, foreach=False)
        tensors[f"clip.total.{s}"] = total.reshape(1).clone()
        opt.step()
        for i, p in enumerate(ps):
            tensors[f"after.{s}.{i}"] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "grad_none.safetensors"))
    meta = dict(hp, steps=STEPS, shapes=[list(s) for s in shapes], lrs=lrs, clip_max_norm=CLIP,
                no_grad=sorted([list(x) for x in NONE]), torch=torch.__version__)
    with open(os.path.join(OUT, "grad_none.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
