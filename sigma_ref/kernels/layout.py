"""GroupLayout: a batch's group ids, checked once, and everything the kernels derive from them.

A model forward runs the same layout through every layer. Building the masks or the packing plan once per
layer would repeat the same work L times, and caching them globally (keyed on a tensor's identity) breaks
under `torch.inference_mode()` and across threads. So the model builds ONE GroupLayout per forward and
passes it down; each derived object (dense masks, packing segments) is computed on first use and kept on
the layout, which dies with the forward.

Right padding: `valid[b, i]` is False for padding. Padding must sit at the end of its row (captions of
different lengths in one batch); the kernels skip it where they can (packing never puts it in a segment)
and every backend returns zeros at padding positions, so all backends still compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masks import causal_mask, sigma_mask


@dataclass
class Segments:
    """Where each token goes when a [B, S] batch is packed into one segment per non-empty (row, group).

    order:      [N_valid] flat token indices (flat = b * S + i) sorted by (row, group), stable, so each
                segment keeps the original token order. Stability is what makes "causal within the segment"
                equal to "causal within the group in the original sequence". Padding is left out.
    lengths:    [num_segments] tokens per segment (empty (row, group) pairs are dropped).
    cu_seqlens: [num_segments + 1] int32 cumulative lengths, contiguous, as flash-attn's varlen API wants.
    segment, rank: [B, S] each token's segment and its position inside it (padding: 0, never read).
    max_len:    the longest segment, as a Python int.
    """

    order: torch.Tensor
    lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    segment: torch.Tensor
    rank: torch.Tensor
    max_len: int


class GroupLayout:
    """Group ids [B, S] (long, >= 0) and an optional padding mask, with memoized masks and segments.

    Build it with `GroupLayout.of(ids, batch, seq_len, device, valid)`, which checks shapes and values and
    raises ValueError naming the argument; the constructor itself trusts its inputs.
    """

    def __init__(self, ids: torch.Tensor, valid: torch.Tensor | None = None):
        self.ids = ids                                      # [B, S] long
        self.valid = valid                                  # [B, S] bool, or None when nothing is padding
        self.batch, self.seq_len = ids.shape
        self._memo: dict = {}

    @classmethod
    def of(cls, ids, batch: int, seq_len: int, device, valid=None, name: str = "group_ids") -> "GroupLayout":
        """Check `ids` ([S] shared by all rows, or [B, S]) and `valid` ([B, S] bool, right padding only)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            seen = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be an integer tensor [batch, seq], got {seen}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(batch, -1)
        if tuple(ids.shape) != (batch, seq_len):
            raise ValueError(f"{name} must have shape [seq] = [{seq_len}] or [batch, seq] = [{batch}, {seq_len}], "
                             f"got {list(ids.shape)}")
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"{name} must be >= 0, got {int(ids.min())}")
        ids = ids.to(device=device, dtype=torch.long)
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (batch, seq_len):
                seen = (valid.dtype, list(valid.shape)) if isinstance(valid, torch.Tensor) else type(valid).__name__
                raise ValueError(f"valid must be a bool tensor of shape [{batch}, {seq_len}] (True = real token), got {seen}")
            if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
                raise ValueError("valid must mark right padding only: once a row has a padding position, every later "
                                 "position of that row must be padding too")
            valid = None if bool(valid.all()) else valid.to(device)
        return cls(ids, valid)

    def memo(self, key, build):
        """build(), computed once per layout and key (every layer of one forward shares it)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # -- dense masks (math, sdpa, flex) ---------------------------------------------------------------

    def allowed(self, grouped: bool) -> torch.Tensor:
        """BoolTensor [B or 1, 1, S, S]: causal, and (if grouped) same group. True = may attend."""
        def build():
            causal = causal_mask(self.seq_len, device=self.ids.device)
            if not grouped:
                return causal[None, None]
            return ((self.ids[:, :, None] == self.ids[:, None, :]) & causal)[:, None]     # [B, 1, S, S]
        return self.memo(("allowed", grouped), build)

    def sigma_mask(self, num_heads: int, num_intra_heads: int) -> torch.Tensor:
        """BoolTensor [B, H, S, S]: the intra mask for heads below num_intra_heads, causal for the rest."""
        return self.memo(("sigma", num_heads, num_intra_heads),
                         lambda: sigma_mask(self.ids, num_heads, num_intra_heads))

    # -- packing (packed, flash) ----------------------------------------------------------------------

    def segments(self) -> Segments:
        """The packing plan of the groups (see `Segments`), computed once per layout."""
        return self.memo("segments", lambda: _make_segments(self.ids, self.valid))

    def zero_padding(self, out: torch.Tensor) -> torch.Tensor:
        """out [B, H, S, d] with padding positions set to 0 (the contract's value there)."""
        if self.valid is None:
            return out
        return out * self.valid[:, None, :, None].to(out.dtype)


def _make_segments(ids: torch.Tensor, valid: torch.Tensor | None) -> Segments:
    batch, seq_len = ids.shape
    num_groups = int(ids.max()) + 1
    row = torch.arange(batch, device=ids.device)[:, None]
    key = (row * num_groups + ids).reshape(-1)                          # [N] (row, group) id
    junk = batch * num_groups                                           # padding's bucket, dropped below
    if valid is not None:
        key = torch.where(valid.reshape(-1), key, torch.full_like(key, junk))
    order = torch.sort(key, stable=True).indices                        # [N]
    counts = torch.bincount(key, minlength=junk + 1)[:junk]             # [B * G]
    present = counts > 0
    compact = torch.cumsum(present, 0) - 1                              # (row, group) -> segment number
    lengths = counts[present]
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32).contiguous()
    num_valid = int(cu_seqlens[-1])
    order = order[:num_valid]                                           # padding sorts last: drop it
    segment = compact[key.clamp_max(junk - 1)]                          # padding: any segment, never read
    # rank = position in the sorted order minus the segment's start.
    position_in_order = torch.zeros_like(key)
    position_in_order[order] = torch.arange(num_valid, device=ids.device)
    rank = (position_in_order - cu_seqlens.long()[segment]).clamp_min(0)
    if valid is not None:
        segment, rank = segment * valid.reshape(-1), rank * valid.reshape(-1)
    return Segments(order, lengths, cu_seqlens, segment.view(batch, seq_len), rank.view(batch, seq_len),
                    int(lengths.max()) if lengths.numel() else 0)
