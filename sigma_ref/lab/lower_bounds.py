"""Lower bounds: what SIGMA would cost with its overheads taken away, timed beside the real thing by bench.py.

A ratio like "SIGMA packed 0.80x causal SDPA" says how far SIGMA is from standard attention, not how far it
is from what it COULD cost. Each floor here does one piece of SIGMA's work with some overhead removed, so the
benchmark can split a gap into "what our code spends" and "what the idea itself costs on these kernels":

    PACKED_SHAPES          the attention kernel's floor: plain causal SDPA over the global heads and the two
                           modality segments, on inputs laid out for it beforehand (nothing gathered).
    FREE_PACKING_MODULE    the SigmaAttention module's floor: SIGMA's exact function on a layout whose two
                           modalities are contiguous halves, so each intra segment is a VIEW of q, k, v and
                           packing costs nothing; projections, gate and autograd as usual.
    GATE_ARITHMETIC        the gate's floor in the tiny model's training step: the gate's matmul, sigmoid
                           and product per layer, forward and backward, on tensors of the step's shapes,
                           with no bias lookup, no extra optimiser state and nothing else.

tests/test_bench.py holds each floor to what its name says (the same calls, the same function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import SigmaAttention
from ..kernels import gate_logits
from ..masks import layout

PACKED_SHAPES = "causal SDPA on the packed shapes"
FREE_PACKING_MODULE = "SigmaAttention module, packing free"
GATE_ARITHMETIC = "standard + the gate's arithmetic"


def half_image_layout(n: int) -> torch.Tensor:
    """Prompt text, an image block, caption text: "T n/4  I n/2  T n/4" (half the tokens image), the layout
    every benchmark row runs on."""
    quarter = n // 4
    return layout(f"T{quarter} I{n - 2 * quarter} T{quarter}")


def packed_shapes(q, k, v, n: int, backward: bool):
    """The (q, k, v) of each causal attention call packed SIGMA makes on half_image_layout(n), q, k, v
    [1, H, n, d]: the global heads over all n tokens (views of the inputs, as packed.py passes them) and the
    intra heads over the two modality segments, padded to the longer one as packed.py pads segments of similar
    length (one grid)."""
    half, head_dim = q.shape[1] // 2, q.shape[-1]
    segment = int(torch.bincount(half_image_layout(n)).max())                     # the longer modality's tokens
    g = torch.Generator().manual_seed(1)
    intra = [torch.randn(2, segment, half, head_dim, generator=g).to(q.device, q.dtype).transpose(1, 2)
             .requires_grad_(backward) for _ in range(3)]                                 # [2, H/2, N/2, d]
    return [tuple(t[:, half:] for t in (q, k, v)), tuple(intra)]


def halves_layout(n: int) -> torch.Tensor:
    """"T n/2 I n/2": the layout on which packing is free (each modality one contiguous segment)."""
    return layout(f"T{n // 2} I{n - n // 2}")


def free_packing_forward(module: SigmaAttention, x: torch.Tensor) -> torch.Tensor:
    """SigmaAttention's y for x [1, n, D] on halves_layout(n) (n even), with the intra segments taken as views.

    The function is the module's (tests/test_bench.py: equal values and gradients); only the packing is gone:
    the first n/2 tokens are text, the rest image, so the intra heads attend causally within each half, which
    is one causal SDPA call on q, k, v reshaped (not copied) to [2, h, n/2, d].
    """
    config = module.config
    batch, n, D = x.shape
    if batch != 1 or n % 2:
        raise ValueError(f"x must have shape [1, n, {D}] with n even, got {list(x.shape)}")
    H, d, h = config.num_heads, config.head_dim, module.num_intra_heads
    q, k, v = (proj(x).view(1, n, H, d).transpose(1, 2) for proj in (module.q_proj, module.k_proj, module.v_proj))
    halves = lambda t: t[:, :h].unflatten(2, (2, n // 2)).transpose(1, 2).flatten(0, 1)     # [2, h, n/2, d] view
    intra = F.scaled_dot_product_attention(halves(q), halves(k), halves(v), is_causal=True)  # [2, h, n/2, d]
    global_ = F.scaled_dot_product_attention(q[:, h:], k[:, h:], v[:, h:], is_causal=True)   # [1, H-h, n, d]
    o = torch.cat([intra.transpose(1, 2).reshape(1, n, h, d), global_.transpose(1, 2)], dim=2).view(1, n, D)
    w = module.weights()                                                                    # gate None: gates off
    gate = None if w.gate is None else torch.sigmoid(gate_logits(x, w.gate, w.table, halves_layout(n)[None]))
    return module.o_proj(o if gate is None else o * gate)                                   # [1, n, D]


def gate_arithmetic_case(rows: int, hidden_size: int, num_layers: int):
    """A callable doing, for each of num_layers layers, what any elementwise gate must: y = o * sigmoid(h W^T)
    forward, and its backward (dh, dW, do: two matmuls, the sigmoid's derivative, two products), on
    [rows, hidden_size] tensors. Timed after a standard training step, it is the floor of a gated step."""
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()
    layers = [(make(rows, hidden_size), make(rows, hidden_size), make(hidden_size, hidden_size))
              for _ in range(num_layers)]
    grad = torch.randn(rows, hidden_size, generator=g)

    def run():
        for h, o, weight in layers:
            torch.autograd.grad(o * torch.sigmoid(h @ weight.t()), (h, o, weight), grad)
    return run
