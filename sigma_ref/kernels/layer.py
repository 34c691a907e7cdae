"""A whole gated attention layer on the CPU packed path as ONE autograd step, so its peak memory is standard's.

Why a layer and not just a kernel: a layer's peak memory is reached inside the attention kernel's backward
pass. At that moment standard attention holds its saved q, k, v and output, the gradient of the output, and
dq, dk, dv. A gated layer built from separate autograd steps holds all of that AND the gate's share of dx,
which the gate's backward computed first and which waits for the q/k/v projections' shares (one more [B, S, D]
tensor). Owning the whole layer lets the backward choose its order:

    1. the gate and o_proj: grad_o = (grad_y W_o) * gate, and the gate's share of dx starts dx;
    2. the attention backward, a few heads at a time (packed.packed_backward_chunks); each chunk's dq, dk, dv
       are folded into dx and into the q/k/v weight gradients at once and then freed,

so dq, dk and dv never exist for all heads at once, and the peak is a few heads' worth of gradients over the
saved tensors, below standard attention's. The forward is the composition the modules write out in
attention.py (tests/test_attention.py holds the two to each other in values and gradients).

    x [B, S, D] --q/k/v--> [B, H, S, d] --packed_forward--> o [B, S, D] --gate, o_proj--> y [B, S, D]

Gated Attention is the case num_intra_heads = 0 (every head global, no stream bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gate import gate_values, gated_output_backward
from .packed import PackPlan, packed_backward_chunks, packed_forward


class GatedPackedLayer(torch.autograd.Function):
    """y = o_proj(sigmoid(x W_g^T + T[ids]) * attention(q_proj(x), k_proj(x), v_proj(x))), CPU tensors.

    Saves x, q, k, v, the attention output and its log-sum-exps (what standard attention keeps); the gate is
    recomputed in the backward pass. Weights are [D, D] as nn.Linear stores them; table [M, D] or None.
    """

    @staticmethod
    def forward(ctx, x, q_weight, k_weight, v_weight, gate_weight, table, out_weight, ids, plan: PackPlan,
                num_heads: int, num_intra_heads: int):
        batch, seq_len, D = x.shape
        q, k, v = (F.linear(x, w).view(batch, seq_len, num_heads, -1).transpose(1, 2)      # [B, H, S, d]
                   for w in (q_weight, k_weight, v_weight))
        out, lse_intra, lse_global = packed_forward(q, k, v, plan, num_intra_heads)        # [B, S, H, d]
        gated = gate_values(x, gate_weight, table, ids).mul_(out.view(batch, seq_len, D))    # [B, S, D]
        ctx.plan, ctx.num_intra_heads = plan, num_intra_heads
        ctx.save_for_backward(x, q, k, v, out, lse_global, q_weight, k_weight, v_weight, gate_weight,
                              table, out_weight, ids, *(lse_intra or ()))
        return F.linear(gated, out_weight)

    @staticmethod
    def backward(ctx, grad_y):
        (x, q, k, v, out, lse_global, q_weight, k_weight, v_weight, gate_weight, table, out_weight,
         ids, *lse_intra) = ctx.saved_tensors                                   # lse_intra: one per grid
        batch, seq_len, D = x.shape
        rows = batch * seq_len
        # 1. o_proj and the gate (gate.py's backward, the gate recomputed); its share of dx starts dx.
        grad_x, grad_o, grad_gate_weight, grad_table, grad_out_weight = gated_output_backward(
            grad_y, x, out.view(batch, seq_len, D), gate_weight, table, ids, out_weight)
        grad_x, x2 = grad_x.view(rows, D), x.reshape(rows, D)                                # [B*S, D]

        # 2. attention, a few heads at a time: fold each chunk into dx and the q/k/v weight gradients.
        weights = (q_weight, k_weight, v_weight)
        grad_weights = [torch.empty_like(w) for w in weights]
        head_dim = D // q.shape[1]
        grad_o = grad_o.view(batch, seq_len, -1, head_dim).transpose(1, 2)                  # [B, H, S, d]
        for a, b, *parts in packed_backward_chunks(grad_o, q, k, v, out.transpose(1, 2), lse_intra, lse_global,
                                                   ctx.plan, ctx.num_intra_heads):
            channels = slice(a * head_dim, b * head_dim)         # these heads' rows of each [D, D] weight
            for weight, grad_weight, part in zip(weights, grad_weights, parts):
                part = part.reshape(rows, -1)                                               # [B*S, (b-a)*d]
                grad_x.addmm_(part, weight[channels])
                torch.mm(part.t(), x2, out=grad_weight[channels])
            del parts
        return (grad_x.view_as(x), *grad_weights, grad_gate_weight, grad_table, grad_out_weight,
                None, None, None, None)

