"""A whole attention layer in ONE call: the same function as the composed path the modules write out, cheaper.

attention.py defines each layer plainly (project, attend, gate, o_proj; `return_details=True` runs exactly
that). For training and generation the modules call `attention_layer` instead, which computes the same
function by the cheapest exact route this machine has:

    1. the CPU packed path, no KV cache, no autocast: the whole gated layer as one autograd Function
       (layer.GatedPackedLayer), whose backward peaks no higher than standard attention's;
    2. otherwise: the projections and the backend's kernel (or the KV cache's decode step), then, for a gated
       layer, gate and o_proj as one autograd Function that recomputes the gate in the backward pass instead
       of storing it (gate.GatedOutputProjection); for an ungated layer, o_proj.

Routes 1 and 2 run the same ops as the composition, so values and gradients agree with the plain definition
(tests/test_attention.py holds them to it, bit for bit where the ops are the same).

    x [B, S, D] --q/k/v--> [B, H, S, d] --kernel--> o [B, S, D] --(gate)--> --o_proj--> y [B, S, D]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import packed
from .dispatch import decode_attention, resolve_backend, sigma_attention
from .gate import gated_output
from .layer import GatedPackedLayer
from .layout import GroupLayout
from .packed import pack_plan


@dataclass
class LayerWeights:
    """One attention layer's weights as nn.Linear stores them ([out, in]).

    gate   the gate's weight [D, D] (both streams stacked, intra rows first), or None for an ungated layer.
    table  the stream bias as one row per modality [M, D] (intra channels first), or None without it.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor | None = None
    table: torch.Tensor | None = None


class KVCache:
    """One layer's keys, values and modality ids so far ([B, H, S, d], [B, H, S, d], [B, S]); starts empty.
    `state` holds what else a layer carries from step to step (MODA: its running Gram sums)."""

    def __init__(self):
        self.k = self.v = self.modality_ids = None
        self.state: dict = {}

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v, modality_ids):
        if self.k is None:
            self.k, self.v, self.modality_ids = k, v, modality_ids
            return
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"cache holds a batch of {self.k.shape[0]} rows but this call has {k.shape[0]}; "
                             "use a fresh KVCache for each batch")
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        self.modality_ids = torch.cat([self.modality_ids, modality_ids], dim=1)


def attend(x, w: LayerWeights, layout: GroupLayout, num_heads: int, num_intra_heads: int, *,
           backend: str = "auto", cache: KVCache | None = None, return_probs: bool = False, edit=None):
    """Project x [B, S, D] into heads and attend: (o [B, S, D] with heads concatenated, probs or None).

    Heads below num_intra_heads attend within their modality, the rest causally over everything. With a
    `KVCache`, x holds only the NEW positions: their keys and values are appended to the cache and they attend
    over everything cached (the same masks, so the intra stream stays pure while decoding).
    """
    B, S, D = x.shape
    q, k, v = (F.linear(x, weight).view(B, S, num_heads, -1).transpose(1, 2) for weight in (w.q, w.k, w.v))
    probs = None
    if cache is not None and cache.k is not None:                     # a decoding step
        cache.append(k, v, layout.ids)
        out = decode_attention(q, cache.k, cache.v, cache.modality_ids, num_intra_heads, backend=backend, edit=edit)
    else:
        if cache is not None:                                         # the prompt: fill the cache
            cache.append(k, v, layout.ids)
        out, probs = sigma_attention(q, k, v, layout, num_intra_heads, backend=backend, return_probs=return_probs,
                                     edit=edit)
    return out.transpose(1, 2).reshape(B, S, D), probs                # [B, H, S, d] -> [B, S, D]


def attention_layer(x, w: LayerWeights, layout: GroupLayout, num_heads: int, num_intra_heads: int, *,
                    backend: str = "auto", cache: KVCache | None = None, edit=None) -> torch.Tensor:
    """y = o_proj(gate * attention(x)) (no gate: o_proj(attention(x))) by the cheapest exact route. [B, S, D].
    `edit` changes the attention probabilities before they weight the values (VAR, var.py)."""
    if w.gate is not None and cache is None and edit is None and _whole_layer_runs(x, num_heads, backend):
        return GatedPackedLayer.apply(x, w.q, w.k, w.v, w.gate, w.table, w.o, layout.ids, pack_plan(layout),
                                      num_heads, num_intra_heads)
    o, _ = attend(x, w, layout, num_heads, num_intra_heads, backend=backend, cache=cache, edit=edit)
    if w.gate is None:
        return F.linear(o, w.o)
    return gated_output(x, o, w.gate, w.table, layout.ids, w.o)


def _whole_layer_runs(x: torch.Tensor, num_heads: int, backend: str) -> bool:
    """Route 1 applies: the backend resolves to `packed` on this CPU and autocast is off (a custom Function
    would run its backward without autocast). Other named backends are checked, with their own error
    messages, where route 2 calls them."""
    if backend not in ("auto", "packed") or torch.is_autocast_enabled(x.device.type):
        return False
    batch, seq_len, D = x.shape
    q_like = x.new_empty(1, 1, 1, 1).expand(batch, num_heads, seq_len, D // num_heads)   # q's shape, no data
    return resolve_backend(backend, q_like) == "packed" and packed.fused_supported(q_like)
