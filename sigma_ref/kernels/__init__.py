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

A `GroupLayout` (layout.py) carries the ids, the padding and everything derived from them; pass one in to
share its masks and packing plan between calls (the model builds one per forward), or pass plain ids.

Beside them, gate.py: the gated layers' last step (gate, product, o_proj) as one autograd Function that keeps
no gate activation for the backward pass; and layer.py: on the CPU packed path, a gated layer's whole forward
(projections, attention, gate, o_proj) as one autograd Function whose backward peaks no higher than
standard attention's (`gated_attention_layer` says where it runs).

Run `python -m sigma_ref demo kernels` to check every available backend against `math` on a random layout.
"""

from __future__ import annotations

import torch

from ..masks import layout as parse_layout
from . import flash, flex, packed
from .gate import GatedOutputProjection, gate_logits, gated_output
from .layer import GatedPackedLayer
from .layout import GroupLayout, Segments
from .packed import causal_attention, pack_plan, packed_attention, sigma_packed_attention
from .reference import dense_decode_attention, math_attention, sdpa_attention

BACKENDS = ("auto", "math", "sdpa", "packed", "flex", "flash")

# Sequences at least this long take the `packed` path under backend="auto" on CPU; shorter ones the dense
# `sdpa` path. Measured with `python -m sigma_ref bench --crossover` (SIGMA attention, sdpa with one per-head
# mask vs packed, fwd+bwd, fp32, B=1, H=8, d=64, half image, 2-core CPU); README.md, "Choosing a backend".
PACKED_MIN_LENGTH = 384


def resolve_backend(backend: str, q: torch.Tensor, *, return_probs: bool = False) -> str:
    """THE dispatcher: turn "auto" into a concrete backend and check that a named one can run on q."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if return_probs and backend not in ("auto", "math"):
        raise ValueError(f"return_probs=True needs backend='math' (the only one that forms the probabilities); "
                         f"got backend={backend!r}")
    if backend == "auto":
        if return_probs:
            return "math"
        if flash_available(q):
            return "flash"
        return "packed" if q.shape[2] >= PACKED_MIN_LENGTH else "sdpa"
    if backend == "flash":
        flash.check_usable(q)
    if backend == "flex":
        flex.check_usable(q)
    return backend


def flash_available(q: torch.Tensor) -> bool:
    """True when backend="flash" can run on q as it is (device, dtype, head size)."""
    try:
        flash.check_usable(q)
    except ValueError:
        return False
    return True


def as_layout(group_ids, q: torch.Tensor, valid=None, name: str = "group_ids") -> GroupLayout:
    """A GroupLayout for q's batch and length: `group_ids` itself if it is one, else checked and wrapped."""
    if isinstance(group_ids, GroupLayout):
        if (group_ids.batch, group_ids.seq_len) != (q.shape[0], q.shape[2]):
            raise ValueError(f"{name} is a GroupLayout for [batch, seq] = [{group_ids.batch}, {group_ids.seq_len}], "
                             f"but q has [{q.shape[0]}, {q.shape[2]}]")
        return group_ids
    return GroupLayout.of(group_ids, q.shape[0], q.shape[2], q.device, valid, name=name)


def grouped_causal_attention(q, k, v, group_ids=None, *, backend: str = "auto", return_probs: bool = False,
                             valid=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention within groups (the contract above). Returns (out [B, H, S, d], probs or None).

    group_ids: [B, S] (or [S]) ints, a GroupLayout, or None for plain causal attention. `probs`
    ([B, H, S, S]) comes from the math backend only: ask with backend="math" or "auto".
    """
    _check_qkv(q, k, v)
    grouped = group_ids is not None
    layout = as_layout(group_ids if grouped else torch.zeros(q.shape[2], dtype=torch.long), q, valid)
    backend = resolve_backend(backend, q, return_probs=return_probs)
    if backend == "math":
        return math_attention(q, k, v, layout, grouped)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, layout, grouped), None
    if backend == "flex":
        return flex.flex_attention(q, k, v, layout, q.shape[1] if grouped else 0), None
    if backend == "packed":
        return (packed_attention if grouped else causal_attention)(q, k, v, layout), None
    return (flash.flash_grouped_attention if grouped else flash.flash_causal_attention)(q, k, v, layout), None


def sigma_attention(q, k, v, modality_ids, num_intra_heads: int, *, backend: str = "auto",
                    return_probs: bool = False, valid=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SIGMA's attention: heads 0..num_intra_heads-1 within modalities, the rest causal over everything.

    q, k, v: [B, H, S, d]; modality_ids: [B, S] (or [S]) or a GroupLayout. Returns (out [B, H, S, d],
    probs [B, H, S, S] or None). Backends that take every head in one call (math, sdpa, flex) get per-head
    masks; the packing backends run the two streams as two calls and join them.
    """
    _check_qkv(q, k, v)
    num_heads = q.shape[1]
    if isinstance(num_intra_heads, bool) or not isinstance(num_intra_heads, int) or not 0 <= num_intra_heads <= num_heads:
        raise ValueError(f"num_intra_heads must be an int in 0..{num_heads} (the number of heads), got {num_intra_heads!r}")
    layout = as_layout(modality_ids, q, valid, name="modality_ids")
    backend = resolve_backend(backend, q, return_probs=return_probs)
    if backend == "math":
        return math_attention(q, k, v, layout, True, num_intra_heads)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, layout, True, num_intra_heads), None
    if backend == "flex":
        return flex.flex_attention(q, k, v, layout, num_intra_heads), None
    if backend == "packed":                            # both streams in one call, written into one output
        return sigma_packed_attention(q, k, v, layout, num_intra_heads), None
    grouped, causal = flash.flash_grouped_attention, flash.flash_causal_attention
    if num_intra_heads in (0, num_heads):              # one stream only: no split, no cat
        return (grouped if num_intra_heads else causal)(q, k, v, layout), None
    # split (not q[:, a:b]): its backward is one cat, where slicing would allocate a zero gradient of full
    # size per slice. The streams are joined along the head axis of the [B, S, H, d] layout the modules use,
    # so the module's final reshape to [B, S, H * d] is free.
    sizes = [num_intra_heads, num_heads - num_intra_heads]
    (q_i, q_g), (k_i, k_g), (v_i, v_g) = q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1)
    outs = [grouped(q_i, k_i, v_i, layout).transpose(1, 2), causal(q_g, k_g, v_g, layout).transpose(1, 2)]
    return torch.cat(outs, dim=2).transpose(1, 2), None                # [B, H, S, d] (a view)


def gated_attention_layer(x, q_weight, k_weight, v_weight, gate_weight, table, out_weight, layout: GroupLayout,
                          num_heads: int, num_intra_heads: int, *, backend: str = "auto") -> torch.Tensor | None:
    """A gated layer, o_proj(sigmoid(x W_g^T + T[ids]) * attention), as ONE autograd step where the backend
    resolves to `packed` on CPU (layer.py: its backward's peak memory is standard attention's); else None, and
    the caller composes the layer from the kernel and `gated_output` as usual. Weights as nn.Linear keeps them
    ([D, D]); table [M, D] or None; x [B, S, D] -> y [B, S, D]."""
    # A custom Function would run its backward without autocast; other named backends are checked (with their
    # error messages) where the composed layer calls them.
    if backend not in ("auto", "packed") or torch.is_autocast_enabled(x.device.type):
        return None
    batch, seq_len, D = x.shape
    q_like = x.new_empty(1, 1, 1, 1).expand(batch, num_heads, seq_len, D // num_heads)   # q's shape, no data
    if resolve_backend(backend, q_like) != "packed" or not packed.fused_supported(q_like):
        return None
    return GatedPackedLayer.apply(x, q_weight, k_weight, v_weight, gate_weight, table, out_weight, layout.ids,
                                  pack_plan(layout), num_heads, num_intra_heads)


def decode_attention(q, k, v, modality_ids: torch.Tensor, num_intra_heads: int, *, backend: str = "auto"):
    """SIGMA attention of the last T positions (q [B, H, T, d]) over all S cached keys (k, v [B, H, S, d]),
    for KV-cache decoding; modality_ids [B, S] covers all S positions. Returns [B, H, T, d].

    Through flash when the backend resolves to it (CUDA, or a substitute), else one dense-mask SDPA call: T is
    small when decoding, so the dense mask [B, H, T, S] is small too.
    """
    if resolve_backend(backend, q) == "flash":
        return flash.flash_decode_attention(q, k, v, modality_ids, num_intra_heads)
    return dense_decode_attention(q, k, v, modality_ids, num_intra_heads)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {shape}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")


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
           "decode_attention", "resolve_backend", "flash_available", "as_layout",
           "GatedOutputProjection", "gate_logits", "gated_output", "GatedPackedLayer", "gated_attention_layer"]
