"""The gated layers' last step, o_proj(sigmoid(x W_g^T + T[ids]) * o), without storing the gate.

Gated Attention and SIGMA multiply each head's output by a gate computed from the layer input (plus, for
SIGMA, the stream bias T looked up by modality), then apply o_proj. Under plain autograd the sigmoid's output
and the gated product are kept for the backward pass: two [B, S, D] activations per layer that standard
attention does not have. GatedOutputProjection keeps only what the layer keeps anyway and recomputes the gate
in its backward pass. attention.py calls `gated_output`; tests/test_attention.py holds it to autograd's
composition bit for bit and measures what it keeps. `gated_product` is the same without o_proj, for layers
whose o_proj is not theirs (sigma_ref.hf's converted layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gate_logits(x, gate_weight, table, ids):
    """x W_g^T + T[ids]: [B, S, D] gate logits (no bias table: x W_g^T)."""
    logits = F.linear(x, gate_weight)                                     # [B, S, D]
    return logits if table is None else logits + F.embedding(ids, table)  # = table[ids], faster backward


def gate_values(x, gate_weight, table, ids):
    """sigmoid(x W_g^T + T[ids]) [B, S, D], without autograd, in ONE buffer: the bias added and the sigmoid
    taken in place. Why: at long sequences every fresh [B, S, D] buffer is 8 MiB or more, which the allocator
    may take from the OS page by page (page faults cost more than the addition itself). The same ops as
    `gate_logits` + sigmoid, so the same bits."""
    logits = F.linear(x, gate_weight)                                     # [B, S, D]
    if table is not None:
        logits += F.embedding(ids, table)
    return logits.sigmoid_()


class GatedOutputProjection(torch.autograd.Function):
    """y = o_proj(sigmoid(x W_g^T + T[ids]) * o), the gated layers' last step, as one autograd step.

    Why: autograd keeps the gate (the sigmoid's output) and the gated product for the backward pass, two
    [B, S, D] activations per layer that standard attention does not have, and in a stack of layers they add
    up. This Function keeps only x, o and the weights, which the layer keeps anyway, and recomputes the gate
    in the backward pass (one [S, D] x [D, D] matmul). It runs the same ops as autograd, so the numbers are
    the same to the bit (tests/test_attention.py).

    What it cannot save: one layer's peak memory is reached later, inside the attention kernel's backward
    pass, and at that moment the gate's share of x's gradient (one [B, S, D] tensor) is already computed and
    waits for the q, k and v projections' shares to be added to it, however this backward is computed; a
    backward that also owns the q/k/v projections does not have it (layer.py, which the modules use on the
    CPU packed path).

    x, o [B, S, D]; gate_weight [D, D]; table [M, D] (the stream bias per modality) or None; ids [B, S];
    out_weight [D, D] (o_proj's).
    """

    @staticmethod
    def forward(ctx, x, o, gate_weight, table, ids, out_weight):
        ctx.save_for_backward(x, o, gate_weight, table, ids, out_weight)
        return F.linear(gate_values(x, gate_weight, table, ids).mul_(o), out_weight)      # the gate not kept

    @staticmethod
    def backward(ctx, grad_y):
        x, o, gate_weight, table, ids, out_weight = ctx.saved_tensors
        grad_x, grad_o, grad_gate_weight, grad_table, grad_out_weight = gated_output_backward(
            grad_y, x, o, gate_weight, table, ids, out_weight)
        return grad_x, grad_o, grad_gate_weight, grad_table, None, grad_out_weight


def gated_output_backward(grad_y, x, o, gate_weight, table, ids, out_weight):
    """The backward of y = o_proj(sigmoid(x W_g^T + T[ids]) * o), the gate recomputed, not stored:
    (dx [B, S, D] (the gate's share), do [B, S, D], dW_g, dT or None, dW_o). The same ops as autograd's, in an
    order (and partly in place) that keeps at most three [B, S, D] temporaries alive at once; layer.py uses it
    too."""
    D = o.shape[-1]
    gate = gate_values(x, gate_weight, table, ids)                              # recomputed, not stored
    grad_y2 = grad_y.reshape(-1, D)                                              # [B*S, D]
    gated = o * gate
    grad_out_weight = grad_y2.t().mm(gated.reshape(-1, D))
    grad_gated = grad_y2.mm(out_weight).view_as(o)
    grad_o = torch.mul(grad_gated, gate, out=gated)        # o_proj's input is used up: its buffer takes grad_o
    grad_logits = grad_gated.mul_(o)                       # now the gate's gradient, and in place below ...
    torch.ops.aten.sigmoid_backward.grad_input(grad_logits, gate, grad_input=grad_logits)     # ... the logits'
    del grad_gated, gate
    grad_x, grad_gate_weight, grad_table = _gate_input_grads(grad_logits, x, gate_weight, table, ids)
    return grad_x, grad_o, grad_gate_weight, grad_table, grad_out_weight


def _gate_input_grads(grad_logits, x, gate_weight, table, ids):
    """From the gradient of the gate logits x W_g^T + T[ids] [B, S, W]: (dx [B, S, D], dW_g [W, D], dT or None)."""
    grad_table = None if table is None else \
        torch.ops.aten.embedding_dense_backward(grad_logits, ids, table.shape[0], -1, False)
    grad_logits2 = grad_logits.reshape(-1, grad_logits.shape[-1])                 # [B*S, W]
    return grad_logits2.mm(gate_weight).view_as(x), grad_logits2.t().mm(x.reshape(-1, x.shape[-1])), grad_table


class GatedProduct(torch.autograd.Function):
    """sigmoid(x W_g^T + T[ids]) * o, the gate recomputed in the backward pass instead of kept: for layers that
    do not own their o_proj (sigma_ref.hf's converted layers, whose o_proj transformers applies after the
    attention function returns). Under autograd the two gates' sigmoid outputs and their concatenation would be
    kept, two [B, S, W] activations per layer; this keeps x and o, which the layer keeps anyway.

    x [B, S, D]; o [B, S, W]; gate_weight [W, D]; table [M, W] or None; ids [B, S].
    """

    @staticmethod
    def forward(ctx, x, o, gate_weight, table, ids):
        ctx.save_for_backward(x, o, gate_weight, table, ids)
        return gate_values(x, gate_weight, table, ids).mul_(o)                           # the gate not kept

    @staticmethod
    def backward(ctx, grad):
        x, o, gate_weight, table, ids = ctx.saved_tensors
        gate = gate_values(x, gate_weight, table, ids)                                   # recomputed
        grad_o = grad * gate
        grad_logits = torch.ops.aten.sigmoid_backward(grad * o, gate)
        del gate
        grad_x, grad_gate_weight, grad_table = _gate_input_grads(grad_logits, x, gate_weight, table, ids)
        return grad_x, grad_o, grad_gate_weight, grad_table, None


def gated_product(x, o, gate_weight, table, ids) -> torch.Tensor:
    """sigmoid(x W_g^T + T[ids]) * o: GatedProduct, or the same ops under autograd where autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return o * torch.sigmoid(gate_logits(x, gate_weight, table, ids))
    return GatedProduct.apply(x, o, gate_weight, table, ids)


def gated_output(x, o, gate_weight, table, ids, out_weight) -> torch.Tensor:
    """o_proj(sigmoid(x W_g^T + T[ids]) * o): GatedOutputProjection, or the same ops under autograd where
    autocast is on (a custom Function would run its backward without it)."""
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(o * torch.sigmoid(gate_logits(x, gate_weight, table, ids)), out_weight)
    return GatedOutputProjection.apply(x, o, gate_weight, table, ids, out_weight)
