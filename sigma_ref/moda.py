"""MODA, MOdular Duplex Attention (Zhang et al., ICML 2025), in miniature: SIGMA's neighbour that aligns keys.

Where SIGMA splits the heads and gates the streams, MODA keeps one causal softmax over the mixed sequence and
changes two things in it:

1. Duplex alignment. Each modality's keys are mapped towards the other's through a Gram matrix of the
   other's normalised keys. For an image key k_j (text keys likewise, with an aligner of their own):
       k_hat_t = (k_t + 1e-6) / |k_t + 1e-6|                              normalised keys        [d]
       G_j     = sum over text tokens t < j of  k_hat_t^T x_t                 x = k ("kk") or v ("kv")  [d, d]
       a_j     = k_hat_j  rownorm(G_j)                                     each row of G to unit length
       k'_j    = W_f (k_j + r * a_j)                                       r [d] starts at 0, W_f [d, d]
   With r = 0 and W_f = I (fuser_init "identity") the keys are unchanged and MODA IS standard attention.
2. A pseudo-logit (the "modular mask"). StableMask-style pseudo-scores p_ij = p_base - (j - i - 1) beta fill
   the masked (future) slots of row i, up to a fixed length n, and are dropped after the softmax: they only
   take probability away. Constant pseudo-scores are one extra logit per row,
       log C_i,  C_i = sum_{m=0}^{n-i-2} exp(p_base - m beta),
   with p_base learnable per (query modality, head), 0 at the start as in the paper. THIS PART IS AN
   INTERPRETATION: the paper gives no mask code and the released code has none. The paper's self- and
   cross-modal masks together cover every earlier token, so the softmax below is plainly causal.

Paper and released code differ, and each difference is a switch (AttentionConfig.moda_*):
    moda_gram        "kk": G = K^T K as the paper writes it;  "kv": G = K^T V as the released code computes it
    moda_duplex      True: both aligners (paper);  False: image keys aligned to text only (released code)
    moda_causal      True: G_j sums only over positions before j;  False: over the whole sequence, as
                     released, which lets a key see text AFTER it (the future, under teacher forcing)
    moda_fuser_init  "identity" (MODA starts as standard attention) or "released" (nn.Linear's default init)
    moda_pseudo_logit, moda_align   the two parts, each removable (the dilution grid's ablations)

One path computes all of it (dense, the `math` backend): the probabilities are needed anyway for the
pseudo-logit, and the course's sequences are short. gram_matrices() builds G_j for every token, as defined;
the layer computes one G per run of same-modality tokens, both directions in the same three matmuls
(alignment_directions: a run of image tokens holds no text, so all its tokens see the same causal sum), the
same function in far less memory and time, held equal by the tests. Two modalities (masks.NUM_MODALITIES):
each run's source is "the other one".

Right padding and KV-cached decoding work as in the other layers; with moda_causal=False a cached decode does
not re-align keys already cached (as released), so it differs from recomputing the sequence, which is that
form's leak made visible.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionConfig, AttentionDetails, _Attention
from .kernels import KVCache
from .masks import IMAGE, NUM_MODALITIES

PSEUDO_LENGTH = 4096       # n: the pseudo-scores run to this length, fixed so that decoding equals recomputing
PSEUDO_BETA = 1.0          # beta: how fast the pseudo-scores fall along the row (the paper does not give it)


def normalised_keys(k: torch.Tensor) -> torch.Tensor:
    """k_hat = (k + 1e-6) / |k + 1e-6| over the last dimension, as the released code computes it."""
    shifted = k + 1e-6
    return shifted / shifted.norm(dim=-1, keepdim=True)


def gram_terms(k: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each position's term k_hat_t^T x_t, zero where `counts` [B, S] is False: [B, H, S, d, d]."""
    k_hat = normalised_keys(k) * counts[:, None, :, None].to(k.dtype)              # [B, H, S, d]
    return k_hat[..., :, None] * x[..., None, :]


def preceding(parts: torch.Tensor, causal: bool, carried: torch.Tensor | None = None) -> torch.Tensor:
    """parts [B, H, N, d, d] -> for each of the N: the sum of the parts before it (causal) or of all of them,
    plus `carried` [B, H, d, d], the sum over positions already cached."""
    if causal:
        before = torch.cat([torch.zeros_like(parts[:, :, :1]), parts[:, :, :-1].cumsum(2)], dim=2)
    else:
        before = parts.sum(2, keepdim=True).expand_as(parts)
    return before if carried is None else before + carried[:, :, None]


def gram_matrices(terms: torch.Tensor, causal: bool, carried: torch.Tensor | None = None) -> torch.Tensor:
    """G_j for every position j [B, H, S, d, d], from gram_terms(): the terms of positions before j (causal)
    or of all positions, plus what is carried from the cache. The definition, one matrix per token."""
    return preceding(terms, causal, carried)


def modality_runs(ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> the index of each position's run of equal ids (0, 0, 1, 1, 1, 2, ...) per row."""
    changes = torch.ones_like(ids, dtype=torch.long)
    changes[:, 1:] = (ids[:, 1:] != ids[:, :-1]).long()
    return changes.cumsum(1) - 1


def alignment_directions(k: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, causal: bool,
                         carried: torch.Tensor | None = None, totals: bool = False):
    """a_j = k_hat_j rownorm(G_j) for every token j at once, each against the OTHER modality's Gram matrix:
    (a [B, H, S, d], and with totals=True the Gram sum of this call's counted tokens per modality
    [B, H, M, d, d], what a cache carries to the next call; else None).

    gram_matrices() builds one [d, d] matrix per token. Here one per run of same-modality tokens suffices: a
    run holds no token of the other modality, so all its tokens see the same sum (the runs of the other
    modality before it; with causal=False, all of them). Three small matmuls, whatever the layout:
        sums  [R, d, d]   each run's terms, k_hat^T x over its counted tokens: k_hat "spread" into its run's
                          slot of an [S, R*d] matrix, times x [S, d]
        grams [R, d, d]   sees [R, R] (earlier runs of the other modality) times sums, + carried [M, d, d]
                          (the cache's sums, by modality) of the other modality
        a     [S, d]      spread [S, R*d] times the row-normalised grams [R*d, d]: each token reads its own run's
    `counts` [B, S] marks the tokens whose terms enter a sum (real tokens, not padding).
    """
    B, H, S, d = k.shape
    runs = modality_runs(ids)                                                      # [B, S]
    num_runs = int(runs.max()) + 1 if runs.numel() else 1
    member = F.one_hot(runs, num_runs).to(k.dtype)                                 # [B, S, R]
    run_ids = ids.new_zeros(B, num_runs).scatter_(1, runs, ids)                    # each run's modality [B, R]
    spread = (normalised_keys(k)[:, :, :, None, :] * member[:, None, :, :, None]).flatten(3)   # [B, H, S, R*d]
    sums = spread.transpose(-2, -1) @ (x * counts[:, None, :, None].to(x.dtype))    # [B, H, R*d, d]
    sums = sums.view(B, H, num_runs, d * d)                                        # [B, H, R, d*d]
    earlier = torch.ones(num_runs, num_runs, dtype=torch.bool, device=k.device)
    earlier = earlier.tril(-1) if causal else earlier
    sees = earlier & (run_ids[:, None, :] != run_ids[:, :, None])                   # [B, R, R]: r sees q
    grams = (sees[:, None].to(k.dtype) @ sums).view(B, H, num_runs, d, d)          # [B, H, R, d, d]
    if carried is not None:                                                        # [B, H, M, d, d]: source = other
        other = (NUM_MODALITIES - 1 - run_ids)[:, None, :, None, None].expand(-1, H, -1, d, d)
        grams = grams + carried.gather(2, other)
    normalised = grams / grams.norm(dim=-1, keepdim=True).clamp_min(1e-12)        # rownorm(G) per run
    a = spread @ normalised.view(B, H, num_runs * d, d)                            # [B, H, S, d]
    if not totals:
        return a, None
    by_modality = F.one_hot(run_ids, NUM_MODALITIES).to(k.dtype).transpose(1, 2)   # [B, M, R]
    return a, (by_modality[:, None] @ sums).view(B, H, NUM_MODALITIES, d, d)       # [B, H, M, d, d]


def row_normalised(gram: torch.Tensor) -> torch.Tensor:
    """Each row of each [d, d] matrix scaled to unit length (a row of zeros stays zero)."""
    return gram / gram.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Aligner(nn.Module):
    """One direction of MODA's alignment: k' = W_f (k + r * k_hat rownorm(G)), W_f shared by every head."""

    def __init__(self, head_dim: int, fuser_init: str):
        super().__init__()
        self.r = nn.Parameter(torch.zeros(head_dim))                          # [d], 0: no alignment at first
        self.fuser = nn.Linear(head_dim, head_dim, bias=False)               # W_f [d, d]
        if fuser_init == "identity":
            with torch.no_grad():
                self.fuser.weight.copy_(torch.eye(head_dim))

    def forward(self, k: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """k [B, H, S, d], gram [B, H, S, d, d] -> aligned keys [B, H, S, d].

        a = k_hat rownorm(G) = sum_r (k_hat[r] / |G[r]|) G[r]: dividing the d-vector k_hat by the row norms
        costs less than normalising every [d, d] matrix, and the sum is one multiply-add over G.
        """
        scale = normalised_keys(k) / gram.norm(dim=-1).clamp_min(1e-12)              # [B, H, S, d]
        a = (scale[..., :, None] * gram).sum(-2)                                     # [B, H, S, d]
        return self.fuser(k + self.r * a)

    def aligned_keys(self, k: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """k' = W_f (k + r * a) from the directions a [B, H, S, d] of alignment_directions()."""
        return self.fuser(k + self.r * a)


def pseudo_logit(positions: torch.Tensor, p_base: torch.Tensor, length: int = PSEUDO_LENGTH,
                 beta: float = PSEUDO_BETA) -> torch.Tensor:
    """log C_i, C_i = sum over the row's masked slots j = i+1 .. length-1 of exp(p_base - (j - i - 1) beta).

    positions [S] (0-based); p_base [B, H, S] (each query's base); -> [B, H, S]. A row with no masked slot
    left (i >= length - 1) gets -inf: no pseudo mass. Closed form of the geometric sum:
        log C = p_base + log(1 - exp(-beta c)) - log(1 - exp(-beta)),  c = length - 1 - i slots.
    """
    slots = (length - 1 - positions).clamp_min(0).to(p_base.dtype)
    return p_base + torch.log(-torch.expm1(-beta * slots)) - math.log(-math.expm1(-beta))


class ModaAttention(_Attention):
    """Causal attention over the mixed sequence with MODA's key alignment and pseudo-logit (module docstring).

    Parameters: q_proj, k_proj, v_proj, o_proj as in StandardAttention (its weights load with strict=False);
    image_aligner (image keys aligned to the text Gram matrix) and, with duplex, text_aligner; p_base
    [NUM_MODALITIES, H] with the pseudo-logit. Keyword switches override the config's moda_* fields.
    """

    def __init__(self, config: AttentionConfig, gram: str | None = None, duplex: bool | None = None,
                 causal: bool | None = None, fuser_init: str | None = None, pseudo_logit: bool | None = None):
        switches = {"moda_gram": gram, "moda_duplex": duplex, "moda_causal": causal, "moda_fuser_init": fuser_init,
                    "moda_pseudo_logit": pseudo_logit}
        if isinstance(config, AttentionConfig):
            config = replace(config, **{name: value for name, value in switches.items() if value is not None})
        super().__init__(config)
        if config.backend not in ("auto", "math"):
            raise ValueError(f"backend must be 'auto' or 'math' for ModaAttention (it computes densely, with its "
                             f"probabilities), got {config.backend!r}")
        d = config.head_dim
        self.image_aligner = Aligner(d, config.moda_fuser_init) if config.moda_align else None
        self.text_aligner = Aligner(d, config.moda_fuser_init) if config.moda_align and config.moda_duplex else None
        if config.moda_pseudo_logit:
            self.p_base = nn.Parameter(torch.zeros(NUM_MODALITIES, config.num_heads))     # [M, H], paper: 0
        else:
            self.register_parameter("p_base", None)

    @property
    def sees_future(self) -> bool:
        """With moda_causal=False (as released) the aligned keys sum the other modality over the whole sequence,
        so an earlier output changes with a later token (_Attention.sees_future)."""
        return self.image_aligner is not None and not self.config.moda_causal

    def heads(self, x: torch.Tensor):
        """x [B, S, D] -> q, k, v [B, H, S, d]."""
        B, S, _ = x.shape
        return [proj(x).view(B, S, self.config.num_heads, -1).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)]

    def align(self, k, v, ids, counts, cache: KVCache | None = None) -> torch.Tensor:
        """Aligned keys [B, H, S, d]: each modality's keys through its aligner, against the other's Gram matrix.
        `counts` [B, S] marks the positions whose terms enter a Gram sum (real tokens, not padding)."""
        if self.image_aligner is None:                  # alignment off (a text aligner needs an image one)
            return k
        carried = cache.state.get("moda_grams") if cache is not None else None     # [B, H, M, d, d]
        x = k if self.config.moda_gram == "kk" else v
        a, totals = alignment_directions(k, x, ids, counts, self.config.moda_causal, carried, cache is not None)
        if cache is not None:                           # every counted token of this call, for the next one
            cache.state["moda_grams"] = totals if carried is None else carried + totals
        image = (ids == IMAGE)[:, None, :, None]                                     # [B, 1, S, 1]
        if self.text_aligner is None:                   # image keys only (the released form)
            return torch.where(image, self.image_aligner.aligned_keys(k, a), k)
        # Both directions: each token's own r and W_f, picked by its modality, in one pass over the keys.
        u = k + torch.where(image, self.image_aligner.r, self.text_aligner.r) * a    # [B, H, S, d]
        return torch.where(image, self.image_aligner.fuser(u), self.text_aligner.fuser(u))

    def forward(self, x, modality_ids, return_details: bool = False, cache: KVCache | None = None, valid=None):
        layout = self._inputs(x, modality_ids, valid)
        B, S, D = x.shape
        real = layout.valid if layout.valid is not None else torch.ones_like(layout.ids, dtype=torch.bool)
        start = cache.length if cache is not None else 0                  # positions already cached
        q, k, v = self.heads(x)                                           # [B, H, S, d]
        k = self.align(k, v, layout.ids, real, cache)
        if cache is not None:
            cache.append(k, v, layout.ids)
            k, v = cache.k, cache.v                                       # [B, H, start + S, d]
        positions = torch.arange(start, start + S, device=x.device)
        allowed = positions[:, None] >= torch.arange(k.shape[2], device=x.device)[None, :]    # causal [S, start+S]
        scores = (q @ k.transpose(-2, -1)) * self.config.head_dim ** -0.5
        scores = scores.masked_fill(~allowed, float("-inf"))              # [B, H, S, start + S]
        if self.p_base is not None:
            base = self.p_base[layout.ids].permute(0, 2, 1)               # [B, H, S]: by query modality and head
            extra = pseudo_logit(positions, base)[..., None]              # [B, H, S, 1]
            probs = torch.cat([scores, extra.to(scores.dtype)], dim=-1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        if self.probs_edit is not None:                                   # VAR (var.py), when it is applied
            probs = self.probs_edit(probs)
        probs = probs * real[:, None, :, None].to(probs.dtype)            # padding queries attend nowhere
        o = (probs @ v).transpose(1, 2).reshape(B, S, D)                  # [B, S, D]
        y = self.o_proj(o)
        if not return_details:
            return y
        return y, AttentionDetails(o[..., :0], o, None, None, probs if cache is None else None)


__all__ = ["ModaAttention", "Aligner", "pseudo_logit", "gram_terms", "gram_matrices", "preceding", "modality_runs",
           "alignment_directions", "row_normalised", "normalised_keys", "PSEUDO_LENGTH", "PSEUDO_BETA"]
