"""Causal attention restricted to groups: one contract, five backends.

THE CONTRACT. `grouped_causal_attention(q, k, v, group_ids)` computes, for every batch row b, head h and
query position i,

    out[b, h, i] = sum_j softmax_j(q[b,h,i] . k[b,h,j] * scale) v[b,h,j]
                   over keys j with j <= i and group_ids[b, j] == group_ids[b, i]

q, k, v are [B, H, S, d]. `group_ids=None` means one group: plain causal attention (the global stream).
With `group_ids = modality_ids` it is SIGMA's intra stream. Every backend computes this same function;
tests/test_kernels.py holds them to it (fp32, 1e-5) on arbitrary layouts.

THE BACKENDS, from "easiest to read" to "fastest":

    math    explicit scores -> mask -> softmax -> weighted sum. O(S^2) memory; returns probabilities.
    sdpa    F.scaled_dot_product_attention with a dense boolean [B, 1, S, S] mask.
    packed  THE KEY TRICK. The intra mask restricted to one modality is exactly the causal mask on that
            modality's subsequence (in original order). So stable-gather each (row, modality) group into
            its own segment, run causal SDPA per segment (one batched call, segments right-padded), and
            gather the results back. Exact, O(S) memory, and the cross-modal blocks are never computed.
    flex    FlexAttention with a BlockMask (cached per layout). Forward-only on CPU in torch 2.13.
    flash   flash-attn: the same packing as `packed`, but without padding: segments are concatenated and
            described by cumulative lengths (`cu_seqlens`) for `flash_attn_varlen_func(causal=True)`.
            CUDA, fp16/bf16 only.
    auto    flash where it can run; else `packed` for long sequences and `sdpa` for short ones, where the
            gather/scatter costs more than the skipped blocks save (crossover measured, see
            PACKED_MIN_LENGTH).

`sigma_attention` applies the contract to SIGMA's two head groups: heads 0..h-1 with the modality groups
(intra stream), heads h..H-1 with one group (global stream).

Run `python -m sigma_ref demo kernels` to check every available backend against `math` on a random layout.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .masks import causal_mask_mod, layout, sigma_mask, sigma_mask_mod

BACKENDS = ("auto", "math", "sdpa", "packed", "flex", "flash")

# Sequences at least this long take the `packed` path under backend="auto" on CPU; shorter ones the dense
# `sdpa` path. Measured with `python -m sigma_ref bench --crossover` on the 2-core CPU machine this course is
# built on (fp32, B=1, H=8, head_dim 64, half image, forward+backward): packed / sdpa was 1.45 at N=128,
# 1.22 at N=256, 0.91 at N=384 and 0.80 at N=512 (README.md, "Choosing a backend").
PACKED_MIN_LENGTH = 384

FLASH_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------


def grouped_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention within groups (see the module docstring). Returns (out [B, H, S, d], probs or None).

    `probs` ([B, H, S, S]) is only available from the math backend: ask for `return_probs=True` with
    backend="math" (or "auto", which then picks math).
    """
    _check_qkv(q, k, v)
    if group_ids is not None:
        group_ids = _check_group_ids(group_ids, q)
    backend = resolve_backend(backend, q, group_ids, return_probs=return_probs)
    if backend == "math":
        return _math(q, k, v, group_ids)
    if return_probs:
        raise ValueError(f"return_probs=True needs backend='math'; got backend={backend!r}")
    if backend == "sdpa":
        return _sdpa(q, k, v, group_ids), None
    if backend == "packed":
        return (_packed(q, k, v, group_ids) if group_ids is not None else _sdpa(q, k, v, None)), None
    if backend == "flex":
        mask = _flex_block_mask(group_ids, 0 if group_ids is None else q.shape[1], q)
        return _flex(q, k, v, mask), None
    return _flash(q, k, v, group_ids), None


def sigma_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modality_ids: torch.Tensor,
    num_intra_heads: int,
    *,
    backend: str = "auto",
    return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SIGMA's attention: heads 0..num_intra_heads-1 within modalities, the rest causal over everything.

    q, k, v: [B, H, S, d]; modality_ids: [B, S]. Returns (out [B, H, S, d], probs [B, H, S, S] or None).
    """
    _check_qkv(q, k, v)
    num_heads = q.shape[1]
    if not 0 <= num_intra_heads <= num_heads:
        raise ValueError(f"num_intra_heads must be in 0..{num_heads} (the number of heads), got {num_intra_heads}")
    modality_ids = _check_group_ids(modality_ids, q)
    resolved = resolve_backend(backend, q, modality_ids, return_probs=return_probs)
    if resolved == "flex":
        # One FlexAttention call for all heads: the BlockMask knows which heads are intra.
        return _flex(q, k, v, _flex_block_mask(modality_ids, num_intra_heads, q)), None
    if resolved == "sdpa" and 0 < num_intra_heads < num_heads and q.shape[2] < PACKED_MIN_LENGTH:
        # Short sequences (the tiny model): one SDPA call with a per-head mask [B, H, S, S], because a second
        # kernel call and the split / cat around it cost more than the attention itself. Long ones keep the
        # global heads on the mask-free causal kernel (below), which a dense mask would slow down.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_sigma_dense_mask(modality_ids, num_intra_heads, num_heads)), None
    if num_intra_heads in (0, num_heads):      # one stream only: no split, no cat
        groups = modality_ids if num_intra_heads else None
        return grouped_causal_attention(q, k, v, groups, backend=resolved, return_probs=return_probs)
    # split (not q[:, a:b]): its backward is one cat, where slicing would allocate a zero gradient of full
    # size per slice. Outputs are joined along the head axis of the [B, S, H, d] layout the modules use, so
    # the module's final reshape to [B, S, H * d] is free.
    sizes = [num_intra_heads, num_heads - num_intra_heads]
    outs, probs = [], []
    for q_s, k_s, v_s, groups in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), (modality_ids, None)):
        if q_s.shape[1] == 0:
            continue
        out, p = grouped_causal_attention(q_s, k_s, v_s, groups, backend=resolved, return_probs=return_probs)
        outs.append(out.transpose(1, 2))                                  # [B, S, H_stream, d]
        probs.append(p)
    probs_out = torch.cat(probs, dim=1) if return_probs else None
    return torch.cat(outs, dim=2).transpose(1, 2), probs_out          # [B, H, S, d] (a view)


def sigma_attention_with_past(q, k, v, modality_ids, num_intra_heads):
    """SIGMA attention for the LAST T positions of a sequence whose keys are all known (KV-cache decoding).

    q: [B, H, T, d] for positions S-T .. S-1; k, v: [B, H, S, d]; modality_ids: [B, S] for all S positions.
    The same masks as `sigma_attention` (intra heads: same modality and causal; global: causal), aligned to
    the bottom-right: query t sits at position S-T+t. Dense-mask SDPA: T is small when decoding.
    """
    batch, heads, num_queries, _ = q.shape
    seq_len = k.shape[2]
    query_pos = torch.arange(seq_len - num_queries, seq_len, device=q.device)
    causal = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]          # [T, S]
    same = modality_ids[:, -num_queries:, None] == modality_ids[:, None, :]                  # [B, T, S]
    is_intra = (torch.arange(heads, device=q.device) < num_intra_heads)[None, :, None, None]
    mask = causal & torch.where(is_intra, same[:, None], torch.ones_like(same[:, None]))  # [B, H, T, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def resolve_backend(backend: str, q: torch.Tensor, group_ids: torch.Tensor | None, *, return_probs: bool = False) -> str:
    """Turn "auto" into a concrete backend and check that a named one can run on these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if return_probs:
            return "math"
        if flash_available(q):
            return "flash"
        return "packed" if q.shape[2] >= PACKED_MIN_LENGTH else "sdpa"
    if backend == "flash":
        _check_flash_usable(q)
    if backend == "flex":
        _check_flex_usable(q)
    return backend


# ---------------------------------------------------------------------------------------------------
# math and sdpa: the definitions, written out
# ---------------------------------------------------------------------------------------------------


def allowed_mask(group_ids: torch.Tensor | None, seq_len: int, device) -> torch.Tensor:
    """BoolTensor [B or 1, 1, S, S]: True where key j <= query i and (if grouped) same group."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if group_ids is None:
        return causal[None, None]
    same_group = group_ids[:, :, None] == group_ids[:, None, :]          # [B, S, S]
    return (same_group & causal)[:, None]                                 # [B, 1, S, S]


_last_dense_mask: tuple = ()


def _sigma_dense_mask(modality_ids, num_intra_heads, num_heads):
    """BoolTensor [B, H, S, S]: intra mask for heads < num_intra_heads, causal for the rest.

    Every layer of one model forward passes the SAME modality-id tensor, so the last mask is kept and reused
    when the tensor object, its version counter (bumped by any in-place change) and the split all match.
    Holding a reference to the tensor keeps its identity from being reused by another tensor.
    """
    global _last_dense_mask
    key = (modality_ids._version, num_intra_heads, num_heads)
    if _last_dense_mask and _last_dense_mask[0] is modality_ids and _last_dense_mask[1] == key:
        return _last_dense_mask[2]
    mask = sigma_mask(modality_ids, num_heads, num_intra_heads)                             # [B, H, S, S]
    _last_dense_mask = (modality_ids, key, mask)
    return mask


def _math(q, k, v, group_ids):
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale                            # [B, H, S, S]
    scores = scores.masked_fill(~allowed_mask(group_ids, q.shape[2], q.device), float("-inf"))
    probs = scores.softmax(dim=-1)          # every row keeps at least its own key, so no all--inf row
    return probs @ v, probs


def _sdpa(q, k, v, group_ids):
    if group_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_mask(group_ids, q.shape[2], q.device))


# ---------------------------------------------------------------------------------------------------
# Segments: where each token goes when the groups are packed
# ---------------------------------------------------------------------------------------------------


@dataclass
class Segments:
    """Bookkeeping for packing a [B, S] batch into one segment per non-empty (row, group).

    order:     [N] flat token indices (N = B*S) sorted by (row, group), stable, so each segment keeps the
               original token order. Stability is what makes "causal within the segment" equal to
               "causal within the group in the original sequence".
    lengths:   [num_segments] tokens per segment (empty (row, group) pairs are dropped).
    cu_seqlens [num_segments + 1] int32 cumulative lengths, as flash-attn's varlen API wants them.
    segment / rank: [N] for each flat token, its segment and its position inside the segment.
    max_len:   the longest segment, as a Python int.
    """

    order: torch.Tensor
    lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    segment: torch.Tensor
    rank: torch.Tensor
    max_len: int


def make_segments(group_ids: torch.Tensor) -> Segments:
    """Segments of a [B, S] group-id tensor (see `Segments`)."""
    batch, seq_len = group_ids.shape
    num_groups = int(group_ids.max()) + 1
    row = torch.arange(batch, device=group_ids.device)[:, None]
    key = (row * num_groups + group_ids).reshape(-1)                      # [N] (row, group) id
    order = torch.sort(key, stable=True).indices                          # [N]
    counts = torch.bincount(key, minlength=batch * num_groups)            # [B * G]
    present = counts > 0
    compact = torch.cumsum(present, 0) - 1                                # (row, group) -> segment number
    lengths = counts[present]
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    segment = compact[key]                                                # [N]
    # rank = position in the sorted order minus the segment's start.
    position_in_order = torch.empty_like(order)
    position_in_order[order] = torch.arange(order.numel(), device=order.device)
    rank = position_in_order - cu_seqlens.long()[segment]
    return Segments(order, lengths, cu_seqlens.contiguous(), segment, rank, int(lengths.max()))


def _packed(q, k, v, group_ids):
    """Exact grouped causal attention by packing each (row, group) into its own right-padded segment."""
    batch, heads, seq_len, dim = q.shape
    seg = make_segments(group_ids)
    num_segments = seg.lengths.numel()
    # Which token fills each slot of the padded [num_segments, max_len] grid, as (row, position) pairs.
    # Padding slots hold token (0, 0): harmless, because padding sits at the END of its segment and causal
    # attention never lets a real query see a key to its right. Padding rows' outputs are never read.
    slot = seg.segment * seg.max_len + seg.rank                           # [N] each token's slot
    source = torch.zeros(num_segments * seg.max_len, dtype=torch.long, device=q.device)
    source[slot] = torch.arange(slot.numel(), device=q.device)
    source_row = (source // seq_len).view(num_segments, seg.max_len)
    source_pos = (source % seq_len).view(num_segments, seg.max_len)

    def pack(t):                                                          # [B, H, S, d] -> [seg, H, L, d]
        # One advanced-indexing gather straight from the strided input: t[rows, :, positions] has shape
        # [seg, L, H, d] (indexed dims first), and the transpose is a view.
        return t[source_row, :, source_pos].transpose(1, 2)

    out = F.scaled_dot_product_attention(pack(q), pack(k), pack(v), is_causal=True)   # [seg, H, L, d]
    segment, rank = seg.segment.view(batch, seq_len), seg.rank.view(batch, seq_len)
    return out.transpose(1, 2)[segment, rank].transpose(1, 2)           # [B, S, H, d] -> [B, H, S, d]


# ---------------------------------------------------------------------------------------------------
# flash: flash-attn's varlen API on the same segments, concatenated instead of padded
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlashFunctions:
    """The two flash-attn functions this backend calls. Swappable for a stand-in (see `flash_implementation`).

    func(q, k, v, causal=True):                         q [B, S, H, d] -> [B, S, H, d]
    varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True)
                                                        q [total, H, d] -> [total, H, d]
    """

    func: Callable
    varlen_func: Callable
    requires_cuda: bool = True
    name: str = "flash-attn"


_flash_override: FlashFunctions | None = None


@functools.lru_cache(maxsize=1)
def _import_flash_attn() -> FlashFunctions | None:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return FlashFunctions(flash_attn_func, flash_attn_varlen_func)


def flash_functions() -> FlashFunctions | None:
    """The flash implementation in use: a stand-in installed by `flash_implementation`, else flash-attn."""
    return _flash_override if _flash_override is not None else _import_flash_attn()


@contextlib.contextmanager
def flash_implementation(functions: FlashFunctions):
    """Use `functions` instead of flash-attn inside the block (tests run the packing on CPU this way)."""
    global _flash_override
    previous, _flash_override = _flash_override, functions
    try:
        yield
    finally:
        _flash_override = previous


def flash_available(q: torch.Tensor) -> bool:
    """True when backend="flash" can run on q as it is (right device, dtype and head size)."""
    try:
        _check_flash_usable(q)
    except ValueError:
        return False
    return True


def _check_flash_usable(q: torch.Tensor) -> None:
    functions = flash_functions()
    if functions is None:
        raise ValueError("backend='flash' needs the flash-attn package, which is not installed "
                         "(pip install -e '.[gpu]' on a CUDA machine); use backend='packed' or 'auto' instead")
    if functions.requires_cuda and q.device.type != "cuda":
        raise ValueError(f"backend='flash' needs CUDA tensors, got tensors on {q.device.type}; "
                         "use backend='packed' (exact, fast on CPU) or 'auto' instead")
    if q.dtype not in FLASH_DTYPES:
        raise ValueError(f"backend='flash' supports float16 and bfloat16 only, got {q.dtype}; run under "
                         "torch.autocast(device_type='cuda', dtype=torch.bfloat16) or use backend='sdpa'")
    head_dim = q.shape[-1]
    if head_dim > 256 or head_dim % 8:
        raise ValueError(f"backend='flash' needs head_dim <= 256 and a multiple of 8, got {head_dim}; "
                         "use backend='sdpa'")


def _flash(q, k, v, group_ids):
    functions = flash_functions()
    batch, heads, seq_len, dim = q.shape
    if group_ids is None:
        # flash-attn wants [B, S, H, d]; ours is [B, H, S, d].
        out = functions.func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    seg = make_segments(group_ids)
    inverse = torch.empty_like(seg.order)
    inverse[seg.order] = torch.arange(seg.order.numel(), device=q.device)

    def pack(t):                                                          # [B, H, S, d] -> [N, H, d]
        return t.transpose(1, 2).reshape(batch * seq_len, heads, dim)[seg.order].contiguous()

    out = functions.varlen_func(pack(q), pack(k), pack(v), seg.cu_seqlens, seg.cu_seqlens,
                                seg.max_len, seg.max_len, causal=True)   # [N, H, d], segment order
    return out[inverse].view(batch, seq_len, heads, dim).transpose(1, 2)


def reference_flash_functions() -> FlashFunctions:
    """A pure-PyTorch stand-in for flash-attn with the same signatures, dtypes and layout rules.

    It enforces what flash-attn enforces (fp16/bf16, int32 contiguous cu_seqlens on q's device, Python-int
    max_seqlen, q as [total, H, d]) and computes each segment's causal attention in fp32, so the packing
    around it can be tested on a CPU. It is slow (a Python loop over segments): a test tool, not a kernel.
    """

    def check(q, k, v):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype not in FLASH_DTYPES:
                raise ValueError(f"flash stand-in: {name} must be float16 or bfloat16, got {t.dtype}")
        if q.shape[-1] % 8 or q.shape[-1] > 256:
            raise ValueError(f"flash stand-in: head_dim must be a multiple of 8 and <= 256, got {q.shape[-1]}")

    def func(q, k, v, causal=False):
        check(q, k, v)
        if q.dim() != 4:
            raise ValueError(f"flash stand-in: q must be [B, S, H, d], got shape {tuple(q.shape)}")
        out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                             v.transpose(1, 2).float(), is_causal=causal)
        return out.transpose(1, 2).to(q.dtype)

    def varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        check(q, k, v)
        if q.dim() != 3:
            raise ValueError(f"flash stand-in: q must be [total, H, d], got shape {tuple(q.shape)}")
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu.dtype != torch.int32 or not cu.is_contiguous() or cu.device != q.device:
                raise ValueError(f"flash stand-in: {name} must be int32, contiguous and on {q.device}")
            if int(cu[-1]) != q.shape[0]:
                raise ValueError(f"flash stand-in: {name}[-1] = {int(cu[-1])} but q has {q.shape[0]} tokens")
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not isinstance(m, int):
                raise ValueError(f"flash stand-in: {name} must be a Python int, got {type(m).__name__}")
        lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        if max(lengths) != max_seqlen_q:
            raise ValueError(f"flash stand-in: max_seqlen_q = {max_seqlen_q} but the longest segment is {max(lengths)}")
        outs = []
        for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            seg = [t[start:end].transpose(0, 1).float()[None] for t in (q, k, v)]     # [1, H, L, d]
            outs.append(F.scaled_dot_product_attention(*seg, is_causal=causal)[0].transpose(0, 1))
        return torch.cat(outs).to(q.dtype)

    return FlashFunctions(func, varlen_func, requires_cuda=False, name="pure-PyTorch stand-in")


# ---------------------------------------------------------------------------------------------------
# flex: FlexAttention with one cached BlockMask per layout
# ---------------------------------------------------------------------------------------------------


def compiler_available() -> bool:
    """torch.compile's CPU backend needs a C++ compiler; FlexAttention is only fast when compiled."""
    return torch.cuda.is_available() or shutil.which("g++") is not None or shutil.which("c++") is not None


def _check_flex_usable(q: torch.Tensor) -> None:
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("backend='flex' is forward-only on CPU (torch: FlexAttention does not support backward "
                         "on CPU); for training use backend='packed' or 'auto', or run flex under torch.no_grad()")


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if compiler_available() else flex_attention


_block_mask_cache: dict = {}


def _flex_block_mask(group_ids, num_intra_heads, q):
    """One BlockMask for all heads of one layout, cached by (layout, split, shape, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, heads, seq_len, _ = q.shape
    ids_key = None if group_ids is None else tuple(group_ids.flatten().tolist())
    key = (ids_key, num_intra_heads, batch, heads, seq_len, str(q.device))
    if key not in _block_mask_cache:
        if group_ids is None or num_intra_heads == 0:
            mask_mod, mask_batch, mask_heads = causal_mask_mod, None, None
        else:
            mask_mod, mask_batch, mask_heads = sigma_mask_mod(group_ids, num_intra_heads), batch, heads
        if len(_block_mask_cache) > 64:         # a training run sees many layouts; keep the cache bounded
            _block_mask_cache.clear()
        _block_mask_cache[key] = create_block_mask(mask_mod, mask_batch, mask_heads, seq_len, seq_len,
                                                   device=q.device)
    return _block_mask_cache[key]


def _flex(q, k, v, block_mask):
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask)


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {shape}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")


def _check_group_ids(group_ids, q):
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor [batch, seq], got "
                         f"{group_ids.dtype if isinstance(group_ids, torch.Tensor) else type(group_ids).__name__}")
    expected = (q.shape[0], q.shape[2])
    if tuple(group_ids.shape) != expected:
        raise ValueError(f"group_ids must have shape [batch, seq] = {list(expected)}, got {list(group_ids.shape)}")
    if int(group_ids.min()) < 0:
        raise ValueError(f"group_ids must be >= 0, got {int(group_ids.min())}")
    return group_ids.to(device=q.device, dtype=torch.long)


def _demo() -> None:
    torch.manual_seed(0)
    ids = layout("T5 I12 T3 I6 T6")[None]
    q, k, v = torch.randn(3, 1, 4, ids.shape[1], 32).unbind(0)
    reference, _ = grouped_causal_attention(q, k, v, ids, backend="math")
    for backend in ("sdpa", "packed", "flex", "flash"):
        try:
            with torch.no_grad():
                out, _ = grouped_causal_attention(q, k, v, ids, backend=backend)
            print(f"{backend:7s} max |out - math| = {(out - reference).abs().max():.2e}")
        except ValueError as error:
            print(f"{backend:7s} not available here: {error}")


if __name__ == "__main__":
    _demo()
