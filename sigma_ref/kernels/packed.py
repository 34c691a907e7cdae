"""The packed backend: THE KEY TRICK of fast exact SIGMA attention.

The intra mask restricted to one modality is exactly the causal mask on that modality's subsequence, in
original order. So: stable-gather each (row, modality) group into its own segment, run causal attention over
the segments (right-padded to the longest), and put the results back. Exact, and the cross-modal blocks are
never computed: with half the tokens image, an intra head does the work of two causal sequences of S/2, half
that of one of S.

    [B, H, S, d] --gather--> [num_segments, h, L, d] --causal flash--> --gather back--> [B, S, h, d]

On CPU the whole SIGMA attention (intra heads packed, global heads causal) is ONE autograd Function,
`SigmaPackedFunction`, built on the two ops that `F.scaled_dot_product_attention` itself calls there (PyTorch's
CPU flash-attention forward, which also returns the log-sum-exp, and its backward). Written as a composition
of ordinary ops, autograd would keep the gathered copies of q, k, v alive until the backward, scatter
gradients with an accumulating index_put into zero-filled tensors, and join the two streams with a cat in each
direction. The Function instead
- saves only q, k, v (the caller's own tensors), the output it returns, the log-sum-exps and the packing
  plan (two index vectors), so nothing packed outlives the forward;
- writes both streams straight into one [B, S, H, d] output (the layout the attention modules reshape to
  [B, S, D] for free), so there is no cat;
- in the backward, re-gathers a few heads at a time, runs the flash backward on them and writes their
  gradients in place into [B, S, H, d] gradient tensors: the extra memory is a few heads' worth, not a copy
  of everything.
Its two halves are plain functions, `packed_forward` and `packed_backward_chunks` (the latter yields each few
heads' gradients), so that layer.py can build a whole gated layer on them and fold each chunk away at once.

Elsewhere (CUDA tensors, or a PyTorch without those ops) the same plan runs as a plain composition of
`F.scaled_dot_product_attention` calls and autograd does the rest.

Right padding never enters a segment (layout.py drops it); its output positions are zero, and no gradient
flows from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import GroupLayout

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@dataclass
class PackPlan:
    """Flat index vectors that move tokens between [B, S] and the padded [num_segments, L] segment grid.

    Both directions are one `index_select` along a flattened token axis (b * S + i, or segment * L + rank):
    on CPU that copies whole [h, d] rows, three to four times faster than indexing [B, S] with a (row,
    position) pair of grids.

    source:        [num_segments * L] the flat token (b * S + i) that fills each slot. Slots past a segment's
                   end hold token 0: harmless, because they sit at the END of their segment and causal
                   attention never lets a real query see a key to its right; their outputs are never read,
                   and `slot_is_real` keeps any gradient from flowing out of them.
    slot:          [B * S] each token's flat slot (segment * L + rank); padding tokens point at slot 0 and
                   are zeroed afterwards.
    segments:      (num_segments, L), the segment grid's shape.
    tokens:        (B, S), the batch's shape.
    slot_is_real:  [num_segments, L, 1, 1] bool: True for a real token's slot; None when every slot is real.
    valid:         [B, S, 1, 1] bool: True for a real token; None without padding.
    """

    source: torch.Tensor
    slot: torch.Tensor
    segments: tuple[int, int]
    tokens: tuple[int, int]
    slot_is_real: torch.Tensor | None
    valid: torch.Tensor | None


def pack_plan(layout: GroupLayout) -> PackPlan:
    """The layout's PackPlan, computed once per layout (every layer of a forward shares it)."""
    def build():
        seg = layout.segments()
        num_segments = seg.lengths.numel()
        token_slot = (seg.segment * seg.max_len + seg.rank).reshape(-1)                          # [B*S]
        filled = token_slot[seg.order]                                                          # [N_valid]
        source = torch.zeros(num_segments * seg.max_len, dtype=torch.long, device=layout.ids.device)
        source[filled] = seg.order
        real = torch.zeros(num_segments * seg.max_len, dtype=torch.bool, device=layout.ids.device)
        real[filled] = True
        slot_is_real = None if bool(real.all()) else real.view(num_segments, seg.max_len, 1, 1)
        valid = None if layout.valid is None else layout.valid[:, :, None, None]
        return PackPlan(source, token_slot, (num_segments, seg.max_len), (layout.batch, layout.seq_len),
                        slot_is_real, valid)
    return layout.memo("pack_plan", build)


def _pack(t: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """[B, h, S, d] -> [num_segments, h, L, d]: one row gather along the flattened tokens (a view of a
    [B, S, h, d]-strided input flattens for free; the transposes are views)."""
    batch, heads, seq_len, dim = t.shape
    flat = t.transpose(1, 2).reshape(batch * seq_len, heads, dim)                 # [B*S, h, d]
    return flat.index_select(0, plan.source).view(*plan.segments, heads, dim).transpose(1, 2)


def _unpack(packed: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """[num_segments, h, L, d] -> [B, S, h, d], each token read from its slot."""
    _, heads, _, dim = packed.shape
    flat = packed.transpose(1, 2).reshape(-1, heads, dim)                         # [seg*L, h, d]
    return flat.index_select(0, plan.slot).view(*plan.tokens, heads, dim)


def _zero_padding_(t: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """t [B, S, H, d] with padding tokens set to 0, in place."""
    if plan.valid is not None:
        t.masked_fill_(~plan.valid, 0)
    return t


def _head_chunks(first: int, last: int, size: int):
    return [(a, min(a + size, last)) for a in range(first, last, size)]


def packed_forward(q, k, v, plan: PackPlan, num_intra_heads: int):
    """The forward of SIGMA attention on CPU, no autograd: heads [0, h) packed, heads [h, H) causal.

    q, k, v [B, H, S, d] -> (out [B, S, H, d], lse_intra [seg, h, L] or None, lse_global [B, H-h, S] or None).
    """
    batch, heads, seq_len, dim = q.shape
    h = num_intra_heads
    # Every entry is written below (padding last, by _zero_padding_), unless there is no segment at all.
    fresh = q.new_empty if plan.source.numel() else q.new_zeros
    out = fresh(batch, seq_len, heads, dim)                                    # [B, S, H, d]
    lse_intra = lse_global = None
    if h < heads:                                                              # global heads: causal, in place
        o, lse_global = _FLASH_CPU(q[:, h:], k[:, h:], v[:, h:], 0.0, True)          # [B, H-h, S, d]
        out[:, :, h:] = o.transpose(1, 2)
        del o
    if h > 0 and plan.source.numel():                                          # intra heads: packed
        o, lse_intra = _FLASH_CPU(*(_pack(t[:, :h], plan) for t in (q, k, v)), 0.0, True)    # [seg, h, L, d]
        out[:, :, :h] = _unpack(o, plan)
        del o
    return _zero_padding_(out, plan), lse_intra, lse_global


def packed_backward_chunks(grad_out, q, k, v, out, lse_intra, lse_global, plan: PackPlan, num_intra_heads: int):
    """The backward of `packed_forward`, a few heads at a time: yields (a, b, dq, dk, dv) for heads [a, b),
    each gradient [B, S, b - a, d] (contiguous) with zeros at padding.

    grad_out, out: [B, H, S, d]. Why chunks: each call runs the flash backward on enough heads to keep every
    thread busy, while the temporaries (the gathered inputs and the op's own gradients) stay a few heads'
    worth; a caller folds each chunk into its own result and lets it go.
    """
    h, heads = num_intra_heads, q.shape[1]
    if plan.valid is not None:                    # padding's outputs are constants: no gradient flows from them
        grad_out = grad_out.masked_fill(~plan.valid.transpose(1, 2), 0)
    threads = torch.get_num_threads()
    for a, b in _head_chunks(h, heads, max(1, threads // q.shape[0])):
        parts = _FLASH_CPU_BACKWARD(grad_out[:, a:b], q[:, a:b], k[:, a:b], v[:, a:b], out[:, a:b],
                                    lse_global[:, a - h:b - h], 0.0, True)
        # A padding query's grad_out is 0 and padding keys are seen only by padding queries (they sit at the
        # end of their row), so every gradient at padding is already 0 here.
        yield (a, b, *(part.transpose(1, 2) for part in parts))
        del parts
    num_segments = plan.segments[0]
    for a, b in _head_chunks(0, h if num_segments else 0, max(1, -(-threads // max(1, num_segments)))):
        packed_grad_out = _pack(grad_out[:, a:b], plan)
        if plan.slot_is_real is not None:          # a filler slot's query must not send gradient to real keys
            packed_grad_out = packed_grad_out.masked_fill(~plan.slot_is_real.transpose(1, 2), 0)
        parts = _FLASH_CPU_BACKWARD(packed_grad_out, *(_pack(t[:, a:b], plan) for t in (q, k, v, out)),
                                    lse_intra[:, a:b], 0.0, True)
        del packed_grad_out
        yield (a, b, *(_zero_padding_(_unpack(part, plan), plan) for part in parts))    # padding read slot 0
        del parts
    if h > 0 and not num_segments:                # every token is padding: the intra heads' gradients are 0
        yield (0, h, *(q.new_zeros(q.shape[0], q.shape[2], h, q.shape[3]) for _ in range(3)))


class SigmaPackedFunction(torch.autograd.Function):
    """SIGMA attention on CPU as one autograd step: `packed_forward`, and a backward that writes each chunk of
    `packed_backward_chunks` in place into [B, S, H, d] gradients. See the module's docstring."""

    @staticmethod
    def forward(ctx, q, k, v, plan: PackPlan, num_intra_heads: int):
        out, lse_intra, lse_global = packed_forward(q, k, v, plan, num_intra_heads)
        ctx.plan, ctx.num_intra_heads = plan, num_intra_heads
        ctx.save_for_backward(q, k, v, out, lse_intra, lse_global)
        return out.transpose(1, 2)                                             # [B, H, S, d] view

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse_intra, lse_global = ctx.saved_tensors
        batch, heads, seq_len, dim = q.shape
        grads = [q.new_empty(batch, seq_len, heads, dim) for _ in range(3)]    # dq, dk, dv as [B, S, H, d]
        for a, b, *parts in packed_backward_chunks(grad_out, q, k, v, out.transpose(1, 2), lse_intra, lse_global,
                                                   ctx.plan, ctx.num_intra_heads):
            for full, part in zip(grads, parts):
                full[:, :, a:b] = part
            del parts
        return (*(g.transpose(1, 2) for g in grads), None, None)


def fused_supported(q: torch.Tensor) -> bool:
    """True where the autograd Functions built on PyTorch's CPU flash ops can run on q (CPU tensors)."""
    return q.device.type == "cpu" and _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None


def sigma_packed_attention(q, k, v, layout: GroupLayout, num_intra_heads: int):
    """Heads [0, num_intra_heads) causal within the layout's groups, the rest causal over everything.
    q, k, v: [B, H, S, d] -> [B, H, S, d] (a view of a [B, S, H, d] tensor); zeros at padding."""
    if num_intra_heads == 0:                       # no intra head: standard attention, nothing to pack
        return causal_attention(q, k, v, layout)
    plan = pack_plan(layout)
    if fused_supported(q):
        return SigmaPackedFunction.apply(q, k, v, plan, num_intra_heads)
    # The same plan as a composition of differentiable ops (CUDA tensors): autograd keeps the gathered copies.
    h, heads = num_intra_heads, q.shape[1]
    if plan.source.numel():
        packed = F.scaled_dot_product_attention(*(_pack(t[:, :h], plan) for t in (q, k, v)), is_causal=True)
        streams = [_unpack(packed, plan)]                                      # [B, S, h, d]
    else:                 # every token is padding: no segment, and zeros out, still computed from q, k and v
        # so that autograd gives them zero gradients (as `math` does) even when every head is intra
        streams = [(q[:, :h] + k[:, :h] + v[:, :h]).transpose(1, 2) * 0]          # [B, S, h, d]
    if h < heads:
        streams.append(F.scaled_dot_product_attention(q[:, h:], k[:, h:], v[:, h:], is_causal=True).transpose(1, 2))
    out = torch.cat(streams, dim=2) if len(streams) > 1 else streams[0]
    if plan.valid is not None:
        out = out.masked_fill(~plan.valid, 0)
    return out.transpose(1, 2)


def packed_attention(q, k, v, layout: GroupLayout):
    """Causal attention within the layout's groups, every head. q, k, v: [B, H, S, d] -> [B, H, S, d]."""
    return sigma_packed_attention(q, k, v, layout, q.shape[1])


def causal_attention(q, k, v, layout: GroupLayout):
    """Every head causal over everything (standard attention on this backend): SDPA's mask-free causal kernel;
    zeros at padding."""
    return layout.zero_padding(F.scaled_dot_product_attention(q, k, v, is_causal=True))
