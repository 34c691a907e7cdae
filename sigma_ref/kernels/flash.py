"""The flash backend: the packing of `packed`, but concatenated instead of padded, for a varlen kernel.

flash-attn has no arbitrary masks, only causal (and sliding windows). Its varlen API takes many sequences
concatenated along the token axis and described by cumulative lengths:

    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True)
        q, k, v: [total_tokens, H, d]; cu_seqlens_*: int32 [num_segments + 1] on the device, contiguous;
        max_seqlen_*: Python ints (upper bounds). fp16 / bf16 only, CUDA only.

SIGMA's intra stream is one varlen call over the (row, modality) segments; the global stream is plain
causal attention. No cross-modal block is ever computed and no padding is ever stored.

CACHED DECODING (`flash_decode_attention`). The T new positions attend over all S cached ones. Global heads:
`flash_attn_with_kvcache` (or `flash_attn_func`) with T queries and S keys, whose causal mask flash-attn
aligns bottom-right, so each new query sees every earlier key. Intra heads: one varlen call with a segment
per (row, modality) holding that modality's new queries and ALL its cached keys (`cu_seqlens_q` and
`cu_seqlens_k` differ); the new queries are the last of their segment, so bottom-right causal is exactly
"earlier keys of my modality". The intra stream stays pure while decoding.

WHICH IMPLEMENTATION. Chosen by feature detection, in this order:
    1. a module installed with `substitute(module)` (tests, outside checks, the course's CPU demonstration);
    2. flash-attn, if it is installed (`pip install flash-attn`, which compiles against CUDA);
    3. on CUDA without flash-attn: PyTorch's own varlen flash kernel, `torch.nn.attention.varlen.varlen_attn`
       (torch >= 2.10; causal is `window_size=(-1, 0)`). Nothing to compile.

THE SEAM. Every call goes through `implementation()`, and `substitute(module, allow_cpu=True)` makes the
backend call `module.flash_attn_varlen_func`, `module.flash_attn_func` and, when the module has it,
`module.flash_attn_with_kvcache` (flash-attn 2.8's names and signatures) instead, accepting CPU tensors.
`sigma_ref.testing.flash_double` is such a module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .layout import GroupLayout

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Implementation:
    """The functions the backend calls, with flash-attn 2.8's signatures, and where they may run."""

    name: str
    varlen_func: Callable        # (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal)
    func: Callable               # (q [B, T, H, d], k [B, S, H, d], v, *, causal) -> [B, T, H, d]
    requires_cuda: bool = True
    kvcache_func: Callable | None = None     # (q [B, T, H, d], k_cache [B, S, H, d], v_cache, *, causal)


_substitute: Implementation | None = None


@contextlib.contextmanager
def substitute(module, allow_cpu: bool = True):
    """Inside the block, the flash backend calls `module` instead of what is installed.

    `module` is flash-attn-like (flash_attn_varlen_func and flash_attn_func, and flash_attn_with_kvcache for
    decoding when it has one) or torch-varlen-like (varlen_attn with torch's signature, wrapped exactly as the
    real torch kernel is). allow_cpu=True lets it run on CPU tensors.
    """
    global _substitute
    name = getattr(module, "__name__", "substitute")
    if callable(getattr(module, "flash_attn_varlen_func", None)) and callable(getattr(module, "flash_attn_func", None)):
        replacement = Implementation(name, module.flash_attn_varlen_func, module.flash_attn_func,
                                     requires_cuda=not allow_cpu,
                                     kvcache_func=getattr(module, "flash_attn_with_kvcache", None))
    elif callable(getattr(module, "varlen_attn", None)):
        replacement = dataclasses.replace(torch_varlen_implementation(module.varlen_attn), name=name,
                                          requires_cuda=not allow_cpu)
    else:
        raise ValueError(f"substitute: module must define flash_attn_varlen_func() and flash_attn_func() (flash-attn's "
                         f"signatures) or varlen_attn() (torch's); {name!r} defines neither")
    previous = _substitute
    _substitute = replacement
    try:
        yield
    finally:
        _substitute = previous


@functools.lru_cache(maxsize=1)
def _installed_flash_attn() -> Implementation | None:
    try:
        import flash_attn                      # optional dependency: the `gpu` extra
    except ImportError:
        return None
    return Implementation("flash-attn " + getattr(flash_attn, "__version__", "?"), flash_attn.flash_attn_varlen_func,
                          flash_attn.flash_attn_func, kvcache_func=flash_attn.flash_attn_with_kvcache)


@functools.lru_cache(maxsize=1)
def _torch_varlen() -> Implementation | None:
    try:
        from torch.nn.attention.varlen import varlen_attn     # optional: torch >= 2.10
    except ImportError:
        return None
    return torch_varlen_implementation(varlen_attn)


def torch_varlen_implementation(varlen_attn: Callable) -> Implementation:
    """flash-attn's two functions written with torch's `varlen_attn` (causal is window_size=(-1, 0))."""

    def varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                    softmax_scale=None, causal=False):
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale,
                           window_size=(-1, 0) if causal else (-1, -1))

    def func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        (batch, q_len), k_len = q.shape[:2], k.shape[1]       # equal-length rows: one segment per row
        cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (batch + 1) * k_len, k_len, dtype=torch.int32, device=q.device)
        out = varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, q_len, k_len,
                          softmax_scale=softmax_scale, causal=causal)
        return out.view(q.shape)

    return Implementation("torch varlen_attn", varlen_func, func)


def implementation(device_type: str = "cuda") -> Implementation | None:
    """What the flash backend calls for tensors on `device_type` (see the module docstring), or None."""
    if _substitute is not None:
        return _substitute
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    return _installed_flash_attn() or _torch_varlen()


def check_usable(q: torch.Tensor) -> None:
    """Raise ValueError saying why backend='flash' cannot run on q, and what to use instead."""
    impl = implementation(q.device.type)
    if impl is None and q.device.type != "cuda":
        raise ValueError(f"backend='flash' needs CUDA tensors, got tensors on {q.device.type}; "
                         "use backend='packed' (exact, fast on CPU) or 'auto' instead")
    if impl is None:
        raise ValueError("backend='flash' found neither flash-attn nor torch's varlen_attn (torch >= 2.10) on this "
                         "CUDA machine; install one of them, or use backend='packed' or 'auto'")
    if impl.requires_cuda and q.device.type != "cuda":
        raise ValueError(f"backend='flash' ({impl.name}) needs CUDA tensors, got tensors on {q.device.type}; "
                         "use backend='packed' or 'auto' instead")
    if q.dtype not in FLASH_DTYPES:
        raise ValueError(f"backend='flash' supports float16 and bfloat16 only, got {q.dtype}; run under "
                         "torch.autocast(device_type='cuda', dtype=torch.bfloat16) or use backend='sdpa'")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"backend='flash' needs head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}; use backend='sdpa'")


def flash_grouped_attention(q, k, v, layout: GroupLayout):
    """Causal attention within groups, one varlen call. q, k, v: [B, H, S, d] -> [B, H, S, d]."""
    impl = implementation(q.device.type)
    batch, heads, seq_len, dim = q.shape
    seg = layout.segments()

    def pack(t):                                                          # [B, H, S, d] -> [N_valid, H, d]
        return t.transpose(1, 2).reshape(batch * seq_len, heads, dim)[seg.order]

    out = impl.varlen_func(pack(q), pack(k), pack(v), seg.cu_seqlens, seg.cu_seqlens,
                           seg.max_len, seg.max_len, causal=True)         # [N_valid, H, d], segment order
    position = seg.cu_seqlens.long()[seg.segment] + seg.rank              # [B, S] each token's packed row
    return layout.zero_padding(out[position].permute(0, 2, 1, 3))        # [B, S, H, d] -> [B, H, S, d]


def flash_causal_attention(q, k, v, layout: GroupLayout):
    """Plain causal attention (the global stream). flash-attn wants [B, S, H, d]; ours is [B, H, S, d]."""
    impl = implementation(q.device.type)
    out = impl.func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return layout.zero_padding(out.transpose(1, 2))


def flash_decode_attention(q, k, v, group_ids: torch.Tensor, num_grouped_heads: int):
    """Cached decoding: the last T positions (q [B, H, T, d]) over all S cached keys (k, v [B, H, S, d]).

    Heads 0..num_grouped_heads-1 attend within their group (group_ids [B, S], all S positions), the others
    causally over everything; see "CACHED DECODING" above. Returns [B, H, T, d].
    """
    impl = implementation(q.device.type)
    heads = q.shape[1]
    sizes = [num_grouped_heads, heads - num_grouped_heads]
    (q_i, q_g), (k_i, k_g), (v_i, v_g) = q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1)
    outs = []
    if num_grouped_heads:
        outs.append(_grouped_decode(impl, q_i, k_i, v_i, group_ids))
    if num_grouped_heads < heads:
        decode = impl.kvcache_func or impl.func
        out = decode(q_g.transpose(1, 2), k_g.transpose(1, 2), v_g.transpose(1, 2), causal=True)   # [B, T, H, d]
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1)


def _grouped_decode(impl, q, k, v, group_ids):
    """One varlen call, a segment per (row, group): the group's new queries against all its cached keys."""
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    groups = int(group_ids.max()) + 1                                       # one host sync per decoding step
    rows = torch.arange(batch, device=q.device)[:, None]
    segment_k = (rows * groups + group_ids).flatten()                       # [B * S] segment of each key
    segment_q = (rows * groups + group_ids[:, -q_len:]).flatten()           # [B * T] the new positions
    order_q, order_k = segment_q.argsort(stable=True), segment_k.argsort(stable=True)

    def cumulative(segment):                                                # int32 [B * groups + 1]
        counts = torch.bincount(segment, minlength=batch * groups)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)

    def pack(t, length, order):                                             # [B, H, L, d] -> [B * L, H, d]
        return t.transpose(1, 2).reshape(batch * length, heads, dim)[order]

    out = impl.varlen_func(pack(q, q_len, order_q), pack(k, k_len, order_k), pack(v, k_len, order_k),
                           cumulative(segment_q), cumulative(segment_k), q_len, k_len, causal=True)
    unpacked = torch.empty_like(out)
    unpacked[order_q] = out                                                 # back to (row, position) order
    return unpacked.view(batch, q_len, heads, dim).transpose(1, 2)         # [B, H, T, d]
