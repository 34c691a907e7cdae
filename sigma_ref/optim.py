"""Muon with its Newton-Schulz iteration in float32, so that it is fast on a CPU as well as on a GPU.

    optimizer = Muon(model.blocks weight matrices, lr=3e-3, weight_decay=0.05)

Muon (Keller Jordan, 2024) replaces a weight matrix's update by the nearest semi-orthogonal matrix to its
momentum, computed with five Newton-Schulz iterations: every direction of the update gets a similar step,
so rare directions are not drowned by common ones. It trains transformers in fewer steps than AdamW, which is
what the course's speedrun needs.

Why not torch.optim.Muon as it is: it runs the iteration in bfloat16, fast on GPUs, but CPUs without bf16
matrix units emulate it: on the course's 2-core machine the optimiser step of the `cpu` model took 280 ms,
three times its forward and backward pass. This class is torch.optim.Muon (same parameter groups, state and
checkpoints) with one change: the iteration runs in the update's own dtype (float32). tests/test_model.py
checks it against torch.optim.Muon step for step. Update sizes follow adjust_lr_fn="match_rms_adamw", so
Muon and AdamW share one learning rate.
"""

from __future__ import annotations

import math

import torch

# The quintic iteration's coefficients, the same as torch.optim.Muon's (chosen to raise small singular values
# fast; the result has singular values roughly in [0.7, 1.2], which trains as well as exact orthogonalisation).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalise(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """[..., A, B] -> [..., A, B]: approximately U V^T for each update = U S V^T, by Newton-Schulz in the
    update's dtype. A stack of same-shaped matrices goes through batched matmuls at once."""
    a, b, c = NEWTON_SCHULZ
    tall = update.shape[-2] > update.shape[-1]
    x = update.mT if tall else update                                      # iterate on the smaller Gram matrix
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])                                         # [n, A, B], A <= B
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)              # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT                                                    # [n, A, A]
        # x <- a x + (b gram + c gram^2) x, each product with its sum as one fused multiply-add (baddbmm)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(shape)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iteration runs in float32 (see the module docstring), on all the
    same-shaped matrices of a parameter group at once (a model's q, k, v, o projections share a shape)."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                         adjust_lr_fn="match_rms_adamw")

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step: closure is not supported, got a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            momenta = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(momenta, grads, 1 - group["momentum"])
            nesterov = torch._foreach_lerp(grads, momenta, group["momentum"])
            # Tall matrices are orthogonalised as their transposes (orthogonalise does the same inside), so a
            # [256, 64] and a [64, 256] matrix share one batched iteration: fewer, larger matmuls.
            by_shape: dict[tuple, list] = {}
            for p, update in zip(params, nesterov):
                tall = p.shape[-2] > p.shape[-1]
                by_shape.setdefault(tuple((update.mT if tall else update).shape), []).append((p, update, tall))
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])          # decoupled weight decay
            for shape, items in by_shape.items():
                wide = torch.stack([u.mT if tall else u for _, u, tall in items])       # [n, small, large]
                orthogonal = orthogonalise(wide, group["ns_steps"], group["eps"])
                # match_rms_adamw: scale so the update's RMS is AdamW's, whatever the matrix's shape.
                scaled_lr = group["lr"] * 0.2 * math.sqrt(max(shape))
                torch._foreach_add_([p for p, _, _ in items],
                                    [o.mT if tall else o for (_, _, tall), o in zip(items, orthogonal.unbind())],
                                    alpha=-scaled_lr)
