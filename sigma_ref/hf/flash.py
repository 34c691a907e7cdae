"""SIGMA's intra stream through a flash-attention kernel, which takes no mask: packed segments.

transformers' flash kernels ("flash_attention_2", "_3", hub kernels: any name with "flash")
take no mask, only padding and cumulative sequence lengths. The global stream is the model's own flash call.
The intra stream is the same flash call on packed tokens: one segment per (row, document, modality) holding
that modality's new tokens as queries and all its tokens so far as keys (`FlashSegments`), passed as
transformers' padding-free varlen arguments (cu_seq_lens_q / _k). flash-attn aligns its causal mask
bottom-right, and the new queries are the last keys of their segment, so "causal within the segment" is the
intra mask, during training, prefill and cached decoding, with left or right padding. A sliding-window
layer's window counts positions of the whole sequence, which a packed segment no longer has: a sequence within
the window runs (the window changes nothing there, and flash applies it only beyond), a longer one needs a
maskable kernel (a ValueError says so). On CPU,
`sigma_ref.testing.hf.hf_flash_double` runs this route through transformers' own flash code with flash_double
as the kernel.

convert.sigma_attention calls `flash_intra` for the intra heads when the model's kernel is a flash one; the
language model's forward pre-hook builds the segments once per forward (`flash_segments`), for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_flash_attention_utils import _is_packed_sequence

from ..masks import NUM_MODALITIES


def is_flash(implementation: str | None) -> bool:
    """Is `implementation` one of transformers' flash-attention kernels? (Its own test: "flash" in the name.)"""
    return implementation is not None and "flash" in implementation


@dataclass
class FlashSegments:
    """The intra stream packed for a varlen flash kernel: one segment per non-empty (row, document, modality).

    order_q   [N_q] indices into the flattened [B * Q] new tokens, segment after segment, each in sequence order
    order_k   [N_k] indices into the flattened [B * K] keys (K = key_length: cached and new tokens), likewise
    cu_q, cu_k   int32 [segments + 1] cumulative lengths; max_q, max_k the longest segment (Python ints)
    A segment's queries are the last of its keys, so flash-attn's bottom-right causal mask is the intra mask.
    Padding is in no segment (its output stays 0), nor is a segment without a new token (cached only).
    """

    order_q: torch.Tensor
    order_k: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    key_length: int


def flash_segments(every, past: int, attention_mask, position_ids, cu_seq_lens=None) -> FlashSegments:
    """The intra stream's segments for a flash kernel (FlashSegments): every [B, K] is the modality of all K
    tokens (cached, then the Q new ones). A token belongs to segment (row, document, modality); documents are the
    sequences that padding-free training packs into one row, as transformers reads them: from `cu_seq_lens`
    (its cu_seq_lens_q, when the caller passes it) or else from position ids restarting at their first value,
    with no attention mask; otherwise one per row. Padding (attention_mask 0) belongs to none."""
    batch, key_length = every.shape
    device = every.device
    if attention_mask is None:
        valid = torch.ones(batch, key_length, dtype=torch.bool, device=device)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
            and attention_mask.shape[1] >= key_length:
        valid = attention_mask[:, :key_length].bool()
    else:
        is_tensor = isinstance(attention_mask, torch.Tensor)
        shape = list(attention_mask.shape) if is_tensor else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a [batch, seq] padding mask of at least {key_length} tokens for a "
                         f"flash-attention kernel with intra heads, got {shape}")
    documents = torch.zeros_like(every)
    if attention_mask is None and past == 0 and batch == 1 and cu_seq_lens is not None:
        starts = cu_seq_lens.to(device)[1:-1]                                  # where documents 1, 2, ... start
        documents = torch.bucketize(torch.arange(key_length, device=device), starts, right=True)[None]
    elif attention_mask is None and past == 0 and position_ids is not None and _is_packed_sequence(position_ids, batch):
        positions = position_ids.to(device)
        documents = (positions == positions.min()).long().cumsum(1)      # a document starts where positions restart
    modalities = NUM_MODALITIES
    per_row = (int(documents.max()) + 1) * modalities
    nowhere = batch * per_row                                       # padding's segment, dropped
    rows = torch.arange(batch, device=device)[:, None]
    segment_k = torch.where(valid, rows * per_row + documents * modalities + every, nowhere)   # [B, K]
    segment_q = segment_k[:, past:]                                 # [B, Q] the new tokens
    count_q = torch.bincount(segment_q.flatten(), minlength=nowhere + 1)
    asked = count_q > 0
    asked[nowhere] = False                                          # segments with a new token; never padding's
    segment_k = torch.where(asked[segment_k], segment_k, nowhere)   # keys of segments without a query: dropped
    count_k = torch.bincount(segment_k.flatten(), minlength=nowhere + 1)
    order_q = torch.sort(segment_q.flatten(), stable=True).indices[:int(count_q[asked].sum())]
    order_k = torch.sort(segment_k.flatten(), stable=True).indices[:int(count_k[asked].sum())]

    def cumulative(counts):                                         # int32 [segments + 1], as flash-attn wants
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)

    lengths_q, lengths_k = count_q[asked], count_k[asked]
    return FlashSegments(order_q, order_k, cumulative(lengths_q), cumulative(lengths_k),
                         int(lengths_q.max()) if lengths_q.numel() else 0,
                         int(lengths_k.max()) if lengths_k.numel() else 0, key_length)


def flash_intra(kernel, module, query, key, value, segments: FlashSegments, kwargs) -> torch.Tensor:
    """The intra stream through the model's flash kernel: query [B, h, Q, d], key / value [B, h_kv, K, d] ->
    [B, Q, h, d]. The tokens are packed into segments (FlashSegments) and handed over as transformers' padding-free
    varlen arguments; outputs go back to their positions, padding stays 0."""
    batch, heads, q_len, dim = query.shape
    key_length = segments.key_length                               # a static cache's unused slots are left out
    out = query.new_zeros(batch * q_len, heads, dim)
    if segments.order_q.numel() == 0:                              # nothing but padding: no query to attend
        return out.view(batch, q_len, heads, dim)

    def pack(t, length, order):                                    # [B, n, L, d] -> [1, n, N, d], segment order
        return t[:, :, :length].transpose(1, 2).reshape(batch * length, t.shape[1], dim)[order].transpose(0, 1)[None]

    q, k, v = pack(query, q_len, segments.order_q), pack(key, key_length, segments.order_k), \
        pack(value, key_length, segments.order_k)
    varlen = {"cu_seq_lens_q": segments.cu_q, "cu_seq_lens_k": segments.cu_k, "max_length_q": segments.max_q,
              "max_length_k": segments.max_k}
    # No window: the caller lets a sliding-window layer here only when the sequence fits in its window, and
    # transformers would otherwise apply it to the packed length, which is not a position in any sequence.
    packed, _ = kernel(module, q, k, v, None, **{**kwargs, "position_ids": None, "sliding_window": None, **varlen})
    out = out.to(packed.dtype).index_put((segments.order_q,), packed[0])
    return out.view(batch, q_len, heads, dim)


class AsTheModelSees:
    """A converted layer as transformers' own kernels must see it: every attribute is the layer's, except its
    config, which is the model's (whose attention implementation names the kernel, e.g. flash_attention_2)."""

    def __init__(self, module):
        self._module = module

    @property
    def config(self):
        return self._module.config._base

    def __getattr__(self, name):
        return getattr(self._module, name)
