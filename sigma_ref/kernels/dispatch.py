"""THE dispatcher: every call into a backend goes through here (the contract is in kernels/__init__.py).

`resolve_backend` turns "auto" into a concrete backend and checks that a named one can run; the two entry
points apply the contract to one group of heads (`grouped_causal_attention`) or to SIGMA's two streams
(`sigma_attention`); `decode_attention` is the same function for the last T positions over a KV cache.
"""

from __future__ import annotations

import torch

from . import flash, flex
from .layout import GroupLayout
from .packed import causal_attention, packed_attention, sigma_packed_attention
from .reference import dense_decode_attention, math_attention, sdpa_attention
from ..checks import check_int

BACKENDS = ("auto", "math", "sdpa", "packed", "flex", "flash")

# Sequences at least this long take the `packed` path under backend="auto" on CPU; shorter ones the dense
# `sdpa` path. Measured with `python -m sigma_ref bench --crossover` (SIGMA attention, sdpa with one per-head
# mask vs packed, fwd+bwd, fp32, B=1, H=8, d=64, half image, 2-core CPU); docs/PERFORMANCE.md, "Choosing a backend".
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
                    return_probs: bool = False, valid=None, edit=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SIGMA's attention: heads 0..num_intra_heads-1 within modalities, the rest causal over everything.

    q, k, v: [B, H, S, d]; modality_ids: [B, S] (or [S]) or a GroupLayout. Returns (out [B, H, S, d],
    probs [B, H, S, S] or None). Backends that take every head in one call (math, sdpa, flex) get per-head
    masks; the packing backends run the two streams as two calls and join them. `edit` (a function of the
    probabilities, VAR's redistribution) needs them, so it runs on the math backend.
    """
    _check_qkv(q, k, v)
    num_heads = q.shape[1]
    check_int("num_intra_heads", num_intra_heads, 0, num_heads, why="(the number of heads)")
    layout = as_layout(modality_ids, q, valid, name="modality_ids")
    if edit is not None and backend not in ("auto", "math"):
        raise ValueError(f"backend {backend!r} returns no probabilities to edit; use backend='math' or 'auto'")
    backend = resolve_backend(backend, q, return_probs=return_probs or edit is not None)
    if backend == "math":
        return math_attention(q, k, v, layout, True, num_intra_heads, edit)
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


def decode_attention(q, k, v, modality_ids: torch.Tensor, num_intra_heads: int, *, backend: str = "auto", edit=None):
    """SIGMA attention of the last T positions (q [B, H, T, d]) over all S cached keys (k, v [B, H, S, d]),
    for KV-cache decoding; modality_ids [B, S] covers all S positions. Returns [B, H, T, d].

    Through flash when the backend resolves to it (CUDA, or a substitute), else one dense-mask SDPA call: T is
    small when decoding, so the dense mask [B, H, T, S] is small too. `edit`: as in sigma_attention.
    """
    if edit is not None:
        return dense_decode_attention(q, k, v, modality_ids, num_intra_heads, edit)
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
