"""Test doubles. `flash_double`: a pure-PyTorch stand-in for flash-attn 2.8, to prove the flash path on CPU.

    from sigma_ref.kernels import flash
    from sigma_ref.testing import flash_double
    with flash.substitute(flash_double):          # the flash backend now calls the double, CPU tensors allowed
        out, _ = sr.sigma_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), ids, 4, backend="flash")

It has flash-attn's names, signatures and keyword defaults, and enforces what flash-attn enforces, so a call
that would fail on a GPU fails here too:
    - q, k, v fp16 or bf16, all the same dtype, on one device; head_dim <= 256 (any size: flash-attn pads);
    - varlen: q [total_q, H, d], k/v [total_k, H_kv, d] with H divisible by H_kv (grouped-query attention);
      cu_seqlens_q / cu_seqlens_k int32, 1-D, contiguous, on q's device, starting at 0, ending at the totals;
      max_seqlen_q / max_seqlen_k Python ints (or 0-d integer tensors, as flash-attn 2 takes), UPPER bounds
      (at least the longest segment);
    - causal=True aligns the mask BOTTOM-RIGHT when a segment's query and key lengths differ (flash-attn >= 2.1):
      query i of Lq sees keys j <= i + Lk - Lq, so a single decoding query sees every cached key; a query row
      with no key gets zeros;
    - with_kvcache: q [B, T, H, d] over the first cache_seqlens[b] cache entries (all when None), after writing
      new k/v into the cache in place when given; k_cache must have a contiguous last dimension.
It also has torch's `varlen_attn` (torch.nn.attention.varlen, the kernel the flash backend uses on CUDA without
flash-attn), with torch's keywords: `scale`, `window_size=(-1, 0)` for causal, `enable_gqa`. Substitute
`flash_double.torch_varlen` to run the flash backend's torch-varlen path on CPU.
It computes in fp32, one segment at a time: slow, exact, a test tool and not a kernel.
"""

from __future__ import annotations

import torch

__all__ = ["flash_double"]


class _FlashDouble:
    """A module-like object: flash_attn_varlen_func, flash_attn_func and flash_attn_with_kvcache, as in
    flash_attn 2.8."""

    __name__ = "sigma_ref.testing.flash_double"

    def __init__(self):
        self.calls: list[str] = []                 # which function ran, in order (tests read it)

    # -- the contract ---------------------------------------------------------------------------------

    @staticmethod
    def _check_tensors(q, k, v, dims: int, layout: str):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != dims:
                raise RuntimeError(f"flash double: {name} must be {layout}, got "
                                   f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.dtype not in (torch.float16, torch.bfloat16):
                raise RuntimeError(f"flash double: FlashAttention only supports fp16 and bf16; {name} is {t.dtype}")
            if t.device != q.device:
                raise RuntimeError(f"flash double: {name} is on {t.device}, q on {q.device}")
            if t.stride(-1) != 1:
                raise RuntimeError(f"flash double: {name} must have contiguous last dimension")
        if not (q.dtype == k.dtype == v.dtype):
            raise RuntimeError(f"flash double: query and key/value must have the same dtype, got {q.dtype}, "
                               f"{k.dtype}, {v.dtype}")
        if q.shape[-1] > 256 or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
            raise RuntimeError(f"flash double: head_dim must match and be <= 256, got q {q.shape[-1]}, "
                               f"k {k.shape[-1]}, v {v.shape[-1]}")
        heads, kv_heads = q.shape[-2], k.shape[-2]
        if v.shape[-2] != kv_heads or heads % kv_heads:
            raise RuntimeError(f"flash double: number of heads in key/value ({kv_heads}) must divide the number "
                               f"of heads in query ({heads})")

    @staticmethod
    def _check_cu(name, cu, device, total):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            raise RuntimeError(f"flash double: {name} must be a 1-D int32 tensor, got "
                               f"{cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__}")
        if not cu.is_contiguous() or cu.device != device:
            raise RuntimeError(f"flash double: {name} must be contiguous and on {device}")
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise RuntimeError(f"flash double: {name} must rise from 0 to {total}, got {cu.tolist()}")

    @staticmethod
    def _attend(q, k, v, scale, causal):
        """One segment: q [Lq, H, d], k/v [Lk, H_kv, d] -> [Lq, H, d], computed in fp32."""
        q_len, heads, _ = q.shape
        k_len, kv_heads, _ = k.shape
        group = heads // kv_heads
        qf = q.float().transpose(0, 1)                                         # [H, Lq, d]
        kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)         # [H, Lk, d]
        vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qf @ kf.transpose(-2, -1)) * scale                           # [H, Lq, Lk]
        if causal:                                                             # bottom-right aligned
            offset = k_len - q_len
            allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + offset
            scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)                   # a row with no key: zeros
        return (probs @ vf).transpose(0, 1)

    # -- flash-attn 2.8's functions -------------------------------------------------------------------

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        self.calls.append("flash_attn_varlen_func")
        self._check_tensors(q, k, v, 3, "[total_tokens, heads, head_dim]")
        self._check_cu("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
        self._check_cu("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0])
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise RuntimeError("flash double: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
        for name, bound, cu in (("max_seqlen_q", max_seqlen_q, cu_seqlens_q), ("max_seqlen_k", max_seqlen_k, cu_seqlens_k)):
            # flash-attn 2's binding also takes a 0-d integer tensor (transformers' packed-sequence path passes
            # one, prepare_fa_kwargs_from_position_ids); flash-attn 4's does not.
            if isinstance(bound, torch.Tensor) and bound.dim() == 0 and not bound.dtype.is_floating_point:
                bound = int(bound)
            if isinstance(bound, bool) or not isinstance(bound, int):
                raise RuntimeError(f"flash double: {name} must be a Python int (or a 0-d integer tensor), got "
                                   f"{type(bound).__name__}")
            longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
            if bound < longest:
                raise RuntimeError(f"flash double: {name} = {bound} is below the longest sequence ({longest})")
        self._check_unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, block_table)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k.tolist(), cu_seqlens_k[1:].tolist())
        for q0, q1, k0, k1 in bounds:
            if q1 > q0 and k1 > k0:
                out[q0:q1] = self._attend(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal)
        return out.to(q.dtype)

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        self.calls.append("flash_attn_func")
        self._check_tensors(q, k, v, 4, "[batch, seq, heads, head_dim]")
        if k.shape[0] != q.shape[0]:
            raise RuntimeError(f"flash double: batch sizes differ, q {q.shape[0]}, k {k.shape[0]}")
        self._check_unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, None)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return torch.stack([self._attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])]).to(q.dtype)

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
        """q [B, T, H, d] over the first cache_seqlens[b] entries of k_cache/v_cache [B, S_cache, H_kv, d] (all S_cache
        when None); with k, v [B, T_new, H_kv, d] they are first written into the cache at cache_seqlens, in place."""
        self.calls.append("flash_attn_with_kvcache")
        self._check_tensors(q, k_cache, v_cache, 4, "[batch, seq, heads, head_dim]")
        batch, cache_len = k_cache.shape[:2]
        if q.shape[0] != batch:
            raise RuntimeError(f"flash double: batch sizes differ, q {q.shape[0]}, k_cache {batch}")
        if (k is None) != (v is None):
            raise RuntimeError("flash double: k and v must be given together")
        if rotary_cos is not None or rotary_sin is not None or cache_batch_idx is not None or cache_leftpad is not None \
                or return_softmax_lse:
            raise NotImplementedError("flash double: rotary embeddings, cache_batch_idx, cache_leftpad and returned "
                                      "log-sum-exp are not modelled")
        self._check_unsupported(0.0, window_size, softcap, alibi_slopes, False, block_table)
        if cache_seqlens is None:
            lengths = [cache_len] * batch if k is None else None
            if k is not None:
                raise RuntimeError("flash double: appending k/v needs cache_seqlens")
        elif isinstance(cache_seqlens, int):
            lengths = [cache_seqlens] * batch
        else:
            if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (batch,):
                raise RuntimeError(f"flash double: cache_seqlens must be an int or int32 [batch], got "
                                   f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
            lengths = cache_seqlens.tolist()
        if k is not None:
            self._check_tensors(q, k, v, 4, "[batch, seq, heads, head_dim]")
            for b, start in enumerate(lengths):
                if start + k.shape[1] > cache_len:
                    raise RuntimeError(f"flash double: row {b} overflows the cache ({start} + {k.shape[1]} > {cache_len})")
                k_cache[b, start:start + k.shape[1]] = k[b]
                v_cache[b, start:start + v.shape[1]] = v[b]
            lengths = [n + k.shape[1] for n in lengths]
        if any(not 0 <= n <= cache_len for n in lengths):
            raise RuntimeError(f"flash double: cache_seqlens must lie in 0..{cache_len}, got {lengths}")
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        rows = [self._attend(q[b], k_cache[b, :n], v_cache[b, :n], scale, causal) if n else
                torch.zeros(q.shape[1:], device=q.device) for b, n in enumerate(lengths)]
        return torch.stack(rows).to(q.dtype)

    # -- torch's own varlen kernel (torch.nn.attention.varlen.varlen_attn, torch >= 2.10) ------------------

    def varlen_attn(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        """torch's signature; causal is window_size=(-1, 0), aligned bottom-right like flash-attn's windows."""
        self.calls.append("varlen_attn")
        if tuple(window_size) not in ((-1, -1), (-1, 0)) or return_aux is not None or seqused_k is not None \
                or block_table is not None:
            raise NotImplementedError("flash double: sliding windows, aux outputs, seqused_k and paged caches are "
                                      "not modelled")
        if key.shape[-2] != query.shape[-2] and not enable_gqa:
            raise RuntimeError("flash double: key/value have fewer heads than query; pass enable_gqa=True")
        return self.flash_attn_varlen_func(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale,
                                           causal=tuple(window_size) == (-1, 0))

    @staticmethod
    def _check_unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, block_table):
        """The double implements what sigma_ref uses; anything else is refused rather than silently ignored."""
        if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs \
                or block_table is not None:
            raise NotImplementedError("flash double: dropout, windows, softcap, ALiBi, returned probabilities and "
                                      "paged caches are not modelled")


class _TorchVarlenView:
    """flash_double seen as torch's varlen module: only `varlen_attn`, so substitute() takes torch's path."""

    __name__ = "sigma_ref.testing.flash_double.torch_varlen"

    def __init__(self, double: _FlashDouble):
        self.varlen_attn = double.varlen_attn


flash_double = _FlashDouble()
flash_double.torch_varlen = _TorchVarlenView(flash_double)
