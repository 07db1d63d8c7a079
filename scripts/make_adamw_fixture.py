#!/usr/bin/env python3
"""Writes tests/fixtures/train/adamw/: torch's AdamW, clip_grad_norm_ and transformers' schedules on small
random inputs, for tests/test_train_loop.cpp (the C++ optimizer, clipping and schedules checked against
them). Run with the heavy tier: /tmp/hv/bin/python scripts/make_adamw_fixture.py

adamw.safetensors (float32):
  param.<i>        the initial values of tensor i (three tensors of different shapes)
  grad.<s>.<i>     the gradient given at step s (s = 0..STEPS-1)
  after.<s>.<i>    torch.optim.AdamW's values after step s (foreach=False, amsgrad off)
  clip.grad.<i>    gradients before clip_grad_norm_(max_norm=CLIP); clip.clipped.<i> after; clip.total the norm
  noclip.grad.<i>  a case below max_norm (left unchanged); noclip.total its norm
adamw.json: the hyper-parameters, the learning rate of each step, and for each schedule the factors
  transformers' LambdaLR gives at every step of a grid (base lr 1.0, so get_last_lr() is the factor).
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

from adamw_fixture_setup import HYPER, initial_tensors, torch_adamw
from transformers.optimization import (get_constant_schedule, get_constant_schedule_with_warmup,
                                       get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "train", "adamw")
STEPS = 6
CLIP = 1.0


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(15)
    shapes = [(4, 16), (24, 4), (7,)]
    tensors = {}
    params = initial_tensors(g, shapes, tensors)
    hp = HYPER
    lrs = [2e-4 * f for f in (0.25, 0.5, 1.0, 1.0, 0.75, 0.1)]
    ps, opt = torch_adamw(params, lrs[0])
    for s in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        for i, p in enumerate(ps):
            # gradients of varied scale, some tiny, so eps and the bias corrections matter
            grad = torch.randn(p.shape, generator=g) * (10.0 ** (-3 + s % 3))
            tensors[f"grad.{s}.{i}"] = grad.clone()
            p.grad = grad.clone()
        opt.step()
        for i, p in enumerate(ps):
            tensors[f"after.{s}.{i}"] = p.detach().clone()

    for prefix, scale in (("clip", 1.0), ("noclip", 0.01)):
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, generator=g) * scale
            tensors[f"{prefix}.grad.{i}"] = p.grad.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, CLIP, foreach=False)
        tensors[f"{prefix}.total"] = total.reshape(1).clone()
        if prefix == "clip":
            for i, p in enumerate(ps):
                tensors[f"{prefix}.clipped.{i}"] = p.grad.clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "adamw.safetensors"))

    schedules = {}
    for name, make in (
        ("linear", lambda o, w, n: get_linear_schedule_with_warmup(o, w, n)),
        ("cosine", lambda o, w, n: get_cosine_schedule_with_warmup(o, w, n)),
        ("constant", lambda o, w, n: get_constant_schedule(o)),
        ("constant_with_warmup", lambda o, w, n: get_constant_schedule_with_warmup(o, w)),
    ):
        for warmup, total in ((0, 1), (0, 10), (3, 10), (10, 10), (7, 100), (1, 37)):
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            sched = make(opt, warmup, total)
            factors = []
            for _ in range(total + 3):  # past the end too: the linear and cosine factors stay at 0
                factors.append(sched.get_last_lr()[0])
                opt.step()
                sched.step()
            schedules[f"{name}/{warmup}/{total}"] = factors
    meta = dict(hp, steps=STEPS, shapes=[list(s) for s in shapes], lrs=lrs, clip_max_norm=CLIP,
                schedules=schedules, torch=torch.__version__)
    with open(os.path.join(OUT, "adamw.json"), "w") as f:
        json.dump(meta, f, indent=1)  # json writes floats with repr: they read back exactly
        f.write("\n")
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
