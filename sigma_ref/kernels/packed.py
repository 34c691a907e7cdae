"""The packed backend: THE KEY TRICK of fast exact SIGMA attention.

The intra mask restricted to one modality is exactly the causal mask on that modality's subsequence, in
original order. So: stable-gather each (row, modality) group into its own segment, run causal attention over
the segments (right-padded to the longest), and put the results back. Exact, and the cross-modal blocks are
never computed: with half the tokens image, an intra head does the work of two causal sequences of S/2, half
that of one of S. Segments of very different lengths go in separate grids (`grid_members`), so that padding
does not give a short segment a long one's cost.

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


# A grid whose longest segment has at least this many tokens is split into grids of similar lengths (below).
# Splitting already pays from about 128 tokens (docs/PERFORMANCE.md); 256 keeps every sequence the course trains
# and evaluates on (at most about 150 tokens) on the kernel calls its committed results were computed with.
SPLIT_FROM = 256


@dataclass
class Grid:
    """One padded [n, L] grid of segments, run by one kernel call.

    source:        [n * L] the flat token (b * S + i) that fills each slot. Slots past a segment's end hold
                   token 0: harmless, because they sit at the END of their segment and causal attention never
                   lets a real query see a key to its right; their outputs are never read, and
                   `slot_is_real` keeps any gradient from flowing out of them.
    shape:         (n, L): n segments, each padded to L, the grid's longest.
    slot_is_real:  [n, L, 1, 1] bool: True for a real token's slot; None when every slot is real.
    """

    source: torch.Tensor
    shape: tuple[int, int]
    slot_is_real: torch.Tensor | None


@dataclass
class PackPlan:
    """Flat index vectors that move tokens between [B, S] and the padded segment grids.

    Both directions are one `index_select` along a flattened token axis (b * S + i, or a slot number): on CPU
    that copies whole [h, d] rows, three to four times faster than indexing [B, S] with a (row, position) pair
    of grids.

    grids:  the segments in one or more padded grids (`grid_members` says which go together). Usually one; a
            short segment beside a long one (a 512-token image in a 2048-token sequence whose text is 1536)
            gets a grid of its own, so that it is not padded to the long one's length.
    slot:   [B * S] each token's slot: slots number the grids' [n, L] cells one grid after the other;
            padding tokens point at slot 0 and are zeroed afterwards.
    tokens: (B, S), the batch's shape.
    valid:  [B, S, 1, 1] bool: True for a real token; None without padding.
    """

    grids: list[Grid]
    slot: torch.Tensor
    tokens: tuple[int, int]
    valid: torch.Tensor | None

    @property
    def num_segments(self) -> int:
        return sum(grid.shape[0] for grid in self.grids)


def grid_members(lengths: list[int], split_from: int | None = None) -> list[list[int]]:
    """Which segments share a padded grid: lists of segment numbers, each in ascending order.

    A causal kernel over a grid of n segments padded to L does about n L^2 / 2 pairs whatever the segments'
    own lengths, so a 512-token segment padded to 1536 costs nine times its own work. Taken longest first, a
    segment joins the current grid unless that grid's longest has at least `split_from` (SPLIT_FROM) tokens
    and the segment is at most half as long; then it starts the next grid. Below SPLIT_FROM everything stays
    in one grid, in segment order (every training batch of the course does).
    """
    split_from = SPLIT_FROM if split_from is None else split_from
    grids: list[list[int]] = []
    longest = 0
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):        # longest first, stable
        if not grids or (longest >= split_from and 2 * lengths[index] <= longest):
            grids.append([])
            longest = lengths[index]
        grids[-1].append(index)
    return [sorted(members) for members in grids]


def pack_plan(layout: GroupLayout) -> PackPlan:
    """The layout's PackPlan, computed once per layout (every layer of a forward shares it)."""
    def build():
        seg = layout.segments()
        lengths = seg.lengths.tolist()
        device = layout.ids.device
        members = grid_members(lengths) if lengths else []
        # Each segment's first slot: its grid's first slot plus its place in the grid times the grid's L. (At
        # least one entry: padding tokens read segment 0's, and a batch of padding has no segment.)
        first_slot = torch.zeros(max(1, len(lengths)), dtype=torch.long)
        shapes, start = [], 0
        for grid in members:
            width = max(lengths[i] for i in grid)
            first_slot[grid] = start + width * torch.arange(len(grid))
            shapes.append((len(grid), width))
            start += len(grid) * width
        token_slot = (first_slot.to(device)[seg.segment] + seg.rank).reshape(-1)                  # [B*S]
        filled = token_slot[seg.order]                                                          # [N_valid]
        source = torch.zeros(start, dtype=torch.long, device=device)
        source[filled] = seg.order
        real = torch.zeros(start, dtype=torch.bool, device=device)
        real[filled] = True
        grids, start = [], 0
        for n, width in shapes:
            cells = slice(start, start + n * width)
            grids.append(Grid(source[cells], (n, width),
                              None if bool(real[cells].all()) else real[cells].view(n, width, 1, 1)))
            start += n * width
        valid = None if layout.valid is None else layout.valid[:, :, None, None]
        return PackPlan(grids, token_slot, (layout.batch, layout.seq_len), valid)
    return layout.memo("pack_plan", build)


def _pack(t: torch.Tensor, grid: Grid) -> torch.Tensor:
    """[B, h, S, d] -> [n, h, L, d], one grid's segments: one row gather along the flattened tokens (a view of
    a [B, S, h, d]-strided input flattens for free; the transposes are views)."""
    batch, heads, seq_len, dim = t.shape
    flat = t.transpose(1, 2).reshape(batch * seq_len, heads, dim)                 # [B*S, h, d]
    return flat.index_select(0, grid.source).view(*grid.shape, heads, dim).transpose(1, 2)


def _unpack(packed: list[torch.Tensor], plan: PackPlan) -> torch.Tensor:
    """One [n, h, L, d] per grid -> [B, S, h, d], each token read from its slot."""
    _, heads, _, dim = packed[0].shape
    flat = [p.transpose(1, 2).reshape(-1, heads, dim) for p in packed]            # [n*L, h, d] each
    flat = flat[0] if len(flat) == 1 else torch.cat(flat)                          # [slots, h, d]
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

    q, k, v [B, H, S, d] -> (out [B, S, H, d], lse_intra (one [n, h, L] per grid) or None,
    lse_global [B, H-h, S] or None).
    """
    batch, heads, seq_len, dim = q.shape
    h = num_intra_heads
    # Every entry is written below (padding last, by _zero_padding_), unless there is no segment at all.
    fresh = q.new_empty if plan.grids else q.new_zeros
    out = fresh(batch, seq_len, heads, dim)                                    # [B, S, H, d]
    lse_intra = lse_global = None
    if h < heads:                                                              # global heads: causal, in place
        o, lse_global = _FLASH_CPU(q[:, h:], k[:, h:], v[:, h:], 0.0, True)          # [B, H-h, S, d]
        out[:, :, h:] = o.transpose(1, 2)
        del o
    if h > 0 and plan.grids:                                                   # intra heads: packed
        o, lse_intra = zip(*(_FLASH_CPU(*(_pack(t[:, :h], grid) for t in (q, k, v)), 0.0, True)
                             for grid in plan.grids))                         # [n, h, L, d], [n, h, L] per grid
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
    num_segments = plan.num_segments
    for a, b in _head_chunks(0, h if num_segments else 0, max(1, -(-threads // max(1, num_segments)))):
        grid_parts = []                                                        # (dq, dk, dv) of each grid
        for grid, lse in zip(plan.grids, lse_intra):
            packed_grad_out = _pack(grad_out[:, a:b], grid)
            if grid.slot_is_real is not None:      # a filler slot's query must not send gradient to real keys
                packed_grad_out = packed_grad_out.masked_fill(~grid.slot_is_real.transpose(1, 2), 0)
            grid_parts.append(_FLASH_CPU_BACKWARD(packed_grad_out, *(_pack(t[:, a:b], grid) for t in (q, k, v, out)),
                                                  lse[:, a:b], 0.0, True))
            del packed_grad_out
        yield (a, b, *(_zero_padding_(_unpack(part, plan), plan) for part in zip(*grid_parts)))  # padding: slot 0
        del grid_parts
    if h > 0 and not num_segments:                # every token is padding: the intra heads' gradients are 0
        yield (0, h, *(q.new_zeros(q.shape[0], q.shape[2], h, q.shape[3]) for _ in range(3)))


class SigmaPackedFunction(torch.autograd.Function):
    """SIGMA attention on CPU as one autograd step: `packed_forward`, and a backward that writes each chunk of
    `packed_backward_chunks` in place into [B, S, H, d] gradients. See the module's docstring."""

    @staticmethod
    def forward(ctx, q, k, v, plan: PackPlan, num_intra_heads: int):
        out, lse_intra, lse_global = packed_forward(q, k, v, plan, num_intra_heads)
        ctx.plan, ctx.num_intra_heads = plan, num_intra_heads
        ctx.save_for_backward(q, k, v, out, lse_global, *(lse_intra or ()))
        return out.transpose(1, 2)                                             # [B, H, S, d] view

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse_global, *lse_intra = ctx.saved_tensors
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
    if plan.grids:
        packed = [F.scaled_dot_product_attention(*(_pack(t[:, :h], grid) for t in (q, k, v)), is_causal=True)
                  for grid in plan.grids]                                      # [n, h, L, d] per grid
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
