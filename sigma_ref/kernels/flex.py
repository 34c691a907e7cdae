"""The flex backend: FlexAttention with one BlockMask for all heads of a layout.

FlexAttention takes the mask as a function mask_mod(b, h, q_idx, kv_idx) -> bool (masks.py writes SIGMA's)
and a BlockMask that lists which (query block, key block) tiles hold any allowed pair, so fully masked
tiles (the cross-modal blocks) are skipped. On CPU in torch 2.13 it is forward-only, and fast only when
compiled (needs a C++ compiler); eager mode materialises the whole score matrix.

Compiling: a compile with static shapes recompiles for every new sequence length and, past torch's recompile
limit (8 per function), silently falls back to unfused flex, which builds the full score matrix. Dynamic
shapes would avoid that, but torch 2.13's CPU code generator fails on flex with dynamic shapes. So lengths
are padded up to a power of two (at least FlexAttention's block of 128): 128 .. 8192 is 7 compiled shapes.
Padding is exact: the padded keys sit after every real query, so causal masks never let a real query see
one, and the padded queries' outputs are cut off.
"""

from __future__ import annotations

import functools
import shutil

import torch
import torch.nn.functional as F

from ..masks import causal_mask_mod, grouped_mask_mod
from .layout import GroupLayout


def compiler_available() -> bool:
    """torch.compile's CPU backend needs a C++ compiler; FlexAttention is only fast when compiled."""
    return torch.cuda.is_available() or shutil.which("g++") is not None or shutil.which("c++") is not None


def check_usable(q: torch.Tensor) -> None:
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("backend='flex' is forward-only on CPU (torch: FlexAttention does not support backward "
                         "on CPU); for training use backend='packed' or 'auto', or run flex under torch.no_grad()")


@functools.lru_cache(maxsize=1)
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention   # optional: only this backend needs it
    return torch.compile(flex_attention, dynamic=False) if compiler_available() else flex_attention


def padded_length(seq_len: int) -> int:
    """The compiled length a sequence of seq_len tokens runs at: the next power of two, at least 128."""
    return max(128, 1 << (seq_len - 1).bit_length())


def flex_attention(q, k, v, layout: GroupLayout, num_intra_heads: int):
    """Heads below num_intra_heads within groups, the rest causal: one call. q, k, v: [B, H, S, d]."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, heads, seq_len, _ = q.shape
    length = padded_length(seq_len)

    def build():
        if num_intra_heads == 0:
            return create_block_mask(causal_mask_mod, None, None, length, length, device=q.device)
        ids = F.pad(layout.ids, (0, length - seq_len))                         # [B, length]
        return create_block_mask(grouped_mask_mod(ids, num_intra_heads), batch, heads, length, length, device=q.device)

    block_mask = layout.memo(("flex", num_intra_heads, heads), build)
    pad = (0, 0, 0, length - seq_len)                                           # [B, H, S, d] -> [B, H, length, d]
    out = _flex_attention()(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), block_mask=block_mask)
    return layout.zero_padding(out[:, :, :seq_len])
