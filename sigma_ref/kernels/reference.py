"""The reference backends: the contract written out, with dense masks.

    math    explicit scores -> mask -> softmax -> weighted sum. O(S^2) memory; the only backend that returns
            the attention probabilities (the probes read them).
    sdpa    one `F.scaled_dot_product_attention` call with a dense boolean mask. For SIGMA the mask is per
            head ([B, H, S, S]: intra heads within their modality, global heads causal), so all heads go in
            one call. On CPU, SDPA computes every block of a dense mask and then discards the masked ones, so
            this is fast only for short sequences (the tiny model); `packed` wins above the crossover.
    decode  queries for the LAST T positions against all S cached keys (KV-cache decoding), the same masks
            aligned bottom-right: query t sits at position S-T+t.

Each function takes q, k, v as [B, H, S, d] and a GroupLayout (layout.py), and returns [B, H, S, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import GroupLayout


def math_attention(q, k, v, layout: GroupLayout, grouped: bool, num_intra_heads: int | None = None, edit=None):
    """(out [B, H, S, d], probs [B, H, S, S]). With `num_intra_heads`, SIGMA's per-head masks; else one mask
    for every head: causal within groups (`grouped`) or plain causal. `edit`, a function of the probabilities,
    changes them before they weight the values (VAR, var.py)."""
    if num_intra_heads is None:
        allowed = layout.allowed(grouped)                                 # [B or 1, 1, S, S]
    else:
        allowed = layout.sigma_mask(q.shape[1], num_intra_heads)         # [B, H, S, S]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5              # [B, H, S, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1)          # every row keeps at least its own key, so no all -inf row
    if edit is not None:
        probs = edit(probs)
    if layout.valid is not None:
        probs = probs * layout.valid[:, None, :, None].to(probs.dtype)   # padding queries attend nowhere
    return probs @ v, probs


def sdpa_attention(q, k, v, layout: GroupLayout, grouped: bool, num_intra_heads: int | None = None):
    """One SDPA call with a dense mask (per head for SIGMA). Mask-free `is_causal` when nothing is grouped."""
    if num_intra_heads is None and not grouped:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = layout.allowed(grouped) if num_intra_heads is None else layout.sigma_mask(q.shape[1], num_intra_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return layout.zero_padding(out)


def dense_decode_attention(q, k, v, modality_ids: torch.Tensor, num_intra_heads: int, edit=None):
    """SIGMA attention of the last T positions (q: [B, H, T, d]) over all S keys (k, v: [B, H, S, d]).

    modality_ids: [B, S] for all S positions. Dense-mask SDPA: T is small when decoding. With `edit`, the
    probabilities are computed explicitly and edited before they weight the values (VAR, var.py).
    """
    batch, heads, num_queries, _ = q.shape
    seq_len = k.shape[2]
    query_pos = torch.arange(seq_len - num_queries, seq_len, device=q.device)
    causal = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]          # [T, S]
    same = modality_ids[:, -num_queries:, None] == modality_ids[:, None, :]                  # [B, T, S]
    is_intra = (torch.arange(heads, device=q.device) < num_intra_heads)[None, :, None, None]
    mask = causal & (same[:, None] | ~is_intra)                                              # [B, H, T, S]
    if edit is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    return edit(scores.softmax(-1)) @ v
