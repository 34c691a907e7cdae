"""The packed backend: THE KEY TRICK of fast exact SIGMA attention.

The intra mask restricted to one modality is exactly the causal mask on that modality's subsequence, in
original order. So: stable-gather each (row, modality) group into its own segment, run ONE batched causal
SDPA over the segments (right-padded to the longest), and gather the results back. Exact, O(S) memory, and
the cross-modal blocks are never computed: with half the tokens image, an intra head does the work of two
causal sequences of S/2, half that of one of S.

    [B, H, S, d] --gather--> [num_segments, H, L, d] --causal SDPA--> --gather back--> [B, H, S, d]

Right padding never enters a segment (layout.py drops it), and its output positions are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import GroupLayout


def packed_attention(q, k, v, layout: GroupLayout):
    """Causal attention within the layout's groups. q, k, v: [B, H, S, d] -> [B, H, S, d]."""
    batch, heads, seq_len, dim = q.shape
    seg = layout.segments()
    num_segments = seg.lengths.numel()
    # Which token fills each slot of the padded [num_segments, max_len] grid, as (row, position) pairs.
    # Slots past a segment's end hold token (0, 0): harmless, because they sit at the END of their segment
    # and causal attention never lets a real query see a key to its right; their outputs are never read.
    slot = seg.segment.reshape(-1)[seg.order] * seg.max_len + seg.rank.reshape(-1)[seg.order]   # [N_valid]
    source = torch.zeros(num_segments * seg.max_len, dtype=torch.long, device=q.device)
    source[slot] = seg.order
    source_row = (source // seq_len).view(num_segments, seg.max_len)
    source_pos = (source % seq_len).view(num_segments, seg.max_len)

    def pack(t):                                                          # [B, H, S, d] -> [seg, H, L, d]
        # One advanced-indexing gather straight from the strided input: t[rows, :, positions] has shape
        # [seg, L, H, d] (indexed dims first), and the transpose is a view.
        return t[source_row, :, source_pos].transpose(1, 2)

    out = F.scaled_dot_product_attention(pack(q), pack(k), pack(v), is_causal=True)   # [seg, H, L, d]
    unpacked = out.transpose(1, 2)[seg.segment, seg.rank].transpose(1, 2)          # [B, S, H, d] -> [B, H, S, d]
    return layout.zero_padding(unpacked)


def causal_attention(q, k, v, layout: GroupLayout):
    """The global stream on this backend: SDPA's mask-free causal kernel; zeros at padding."""
    return layout.zero_padding(F.scaled_dot_product_attention(q, k, v, is_causal=True))
