"""The set-up both AdamW fixture writers share (scripts/make_adamw_fixture.py, make_adamw_grad_none_fixture.py):
random initial tensors recorded as param.<i>, and torch.optim.AdamW over copies of them with the hyper-parameters
the C++ tests read back from each fixture's JSON (foreach off, amsgrad off: the plain per-tensor loop)."""
import torch

HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def initial_tensors(g, shapes, tensors):
    """Tensors of `shapes` drawn from generator g (normal x 0.1), stored as tensors['param.<i>']."""
    params = [torch.randn(s, generator=g, dtype=torch.float32) * 0.1 for s in shapes]
    tensors.update({f"param.{i}": p.clone() for i, p in enumerate(params)})
    return params


def torch_adamw(params, lr):
    """Trainable copies of params and torch's AdamW over them at learning rate lr."""
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ps, lr=lr, betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], amsgrad=False, foreach=False)
    return ps, opt
