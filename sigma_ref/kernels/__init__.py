"""Causal attention restricted to groups: one contract, one dispatcher, one file per backend.

THE CONTRACT. `grouped_causal_attention(q, k, v, group_ids)` computes, for every batch row b, head h and
query position i,

    out[b, h, i] = sum_j softmax_j(q[b,h,i] . k[b,h,j] * scale) v[b,h,j]
                   over keys j with j <= i and group_ids[b, j] == group_ids[b, i]

and 0 at right-padding positions (`valid[b, i]` False). q, k, v are [B, H, S, d]. `group_ids=None` means
one group: plain causal attention (the global stream). With `group_ids = modality_ids` it is SIGMA's intra
stream. `sigma_attention` applies the contract to SIGMA's two head groups: heads 0..h-1 with the modality
groups (intra stream), heads h..H-1 with one group (global stream). Every backend computes the same function;
tests/test_kernels.py holds them to it (fp32, 1e-5) on arbitrary layouts.

THE BACKENDS, from "easiest to read" to "fastest" (one file each):

    math     reference.py   scores -> mask -> softmax -> sum; returns the probabilities
    sdpa     reference.py   one F.scaled_dot_product_attention call with a dense (per-head) boolean mask
    packed   packed.py      gather each (row, modality) into a segment, causal flash attention, gather back;
                            on CPU one autograd Function for both streams (saves no gathered copies)
    flex     flex.py        FlexAttention with a BlockMask (forward-only on CPU)
    flash    flash.py       flash-attn's varlen kernel (or torch's own) on the packed segments; CUDA, fp16/bf16
    auto     flash where it can run; else `packed` from PACKED_MIN_LENGTH tokens on, `sdpa` below, where the
             gather/scatter costs more than the skipped blocks save (the crossover is measured, not guessed)

THE FILES. dispatch.py holds the one dispatcher (`resolve_backend`) and the entry points below; layout.py
the `GroupLayout` (the ids, the padding and everything derived from them; pass one in to share its masks and
packing plan between calls, as the model does once per forward, or pass plain ids); one file per backend.

THE SAME FUNCTION, CHEAPER. fused.py computes a whole attention layer (projections, kernel, gate, o_proj) in
one call, `attention_layer`, which the modules use outside `return_details`; it picks gate.py (gate and
o_proj as one autograd Function that recomputes the gate in the backward pass) and layer.py (on the CPU
packed path, the whole gated layer as one Function whose backward peaks no higher than standard attention's).

Run `python -m sigma_ref demo kernels` to check every available backend against `math` on a random layout.
"""

from __future__ import annotations

import torch

from ..masks import layout as parse_layout
from .dispatch import (BACKENDS, PACKED_MIN_LENGTH, as_layout, decode_attention, flash_available,
                       grouped_causal_attention, resolve_backend, sigma_attention)
from .fused import KVCache, LayerWeights, attend, attention_layer
from .gate import GatedOutputProjection, GatedProduct, gate_logits, gated_output, gated_product
from .layer import GatedPackedLayer
from .layout import GroupLayout, Segments


def _demo() -> None:
    torch.manual_seed(0)
    ids = parse_layout("T5 I12 T3 I6 T6")[None]
    q, k, v = torch.randn(3, 1, 4, ids.shape[1], 32).unbind(0)
    reference, _ = grouped_causal_attention(q, k, v, ids, backend="math")
    for backend in ("sdpa", "packed", "flex", "flash"):
        try:
            with torch.no_grad():
                out, _ = grouped_causal_attention(q, k, v, ids, backend=backend)
            print(f"{backend:7s} max |out - math| = {(out - reference).abs().max():.2e}")
        except ValueError as error:
            print(f"{backend:7s} not available here: {error}")


__all__ = ["BACKENDS", "PACKED_MIN_LENGTH", "GroupLayout", "Segments", "grouped_causal_attention", "sigma_attention",
           "decode_attention", "resolve_backend", "flash_available", "as_layout", "KVCache", "LayerWeights",
           "attend", "attention_layer", "GatedOutputProjection", "GatedProduct", "gate_logits", "gated_output",
           "gated_product", "GatedPackedLayer"]
