"""The flash-attn double is only worth its name if it behaves like flash-attn 2.8. Held to a dense reference
on the cases flash-attn's own tests use: query shorter than keys, one-token decode, mixed and empty segments."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sigma_ref.testing import flash_double as fd


def dense_reference(q, k, v, causal, scale=None):
    """One sequence, [Lq, H, d] x [Lk, H_kv, d], bottom-right causal, fp32; rows with no key are zero."""
    q_len, heads, dim = q.shape
    k_len, kv_heads, _ = k.shape
    k = k.float().repeat_interleave(heads // kv_heads, 1)
    v = v.float().repeat_interleave(heads // kv_heads, 1)
    out = torch.zeros(q_len, heads, dim)
    for i in range(q_len):
        last_key = i + k_len - q_len if causal else k_len - 1
        if last_key < 0:
            continue
        scores = torch.einsum("hd,khd->hk", q[i].float(), k[:last_key + 1]) * (scale or dim ** -0.5)
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[:last_key + 1])
    return out


@settings(max_examples=25)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9)), min_size=1, max_size=4),
       st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.booleans(), st.sampled_from([None, 0.3]))
def test_varlen_matches_dense_reference(lengths, heads, causal, scale):
    """Mixed segment lengths, query shorter or longer than keys, empty segments, grouped-query k/v."""
    h, h_kv = heads
    g = torch.Generator().manual_seed(len(lengths))
    q = torch.randn(sum(a for a, _ in lengths), h, 12, generator=g).bfloat16()      # head_dim 12: not a multiple of 8
    k, v = (torch.randn(sum(b for _, b in lengths), h_kv, 12, generator=g).bfloat16() for _ in range(2))
    cu_q = torch.tensor([0] + [sum(a for a, _ in lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(b for _, b in lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    out = fd.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 16, 16, softmax_scale=scale, causal=causal)   # bounds above
    for (q0, q1), (k0, k1) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()), zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        expected = dense_reference(q[q0:q1], k[k0:k1], v[k0:k1], causal, scale)
        torch.testing.assert_close(out[q0:q1].float(), expected, atol=1e-2, rtol=1e-2)


def test_one_token_decode_sees_every_cached_key():
    """Bottom-right alignment: a single query against 5 keys is the LAST position, not the first."""
    q = torch.randn(1, 2, 8).bfloat16()
    k, v = torch.randn(2, 5, 2, 8).bfloat16().unbind(0)
    cu_q, cu_k = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    out = fd.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, 5, causal=True)
    torch.testing.assert_close(out.float(), dense_reference(q, k, v, causal=False), atol=1e-2, rtol=1e-2)


def test_a_zero_dim_integer_tensor_is_a_bound_as_flash_attn_2_takes_it():
    """transformers' packed-sequence path passes max_seqlen as a 0-d tensor; flash-attn 2 converts it."""
    q, k, v = torch.randn(3, 6, 2, 8).bfloat16().unbind(0)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    as_tensor = fd.flash_attn_varlen_func(q, k, v, cu, cu, torch.tensor(4), torch.tensor(4), causal=True)
    assert torch.equal(as_tensor, fd.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True))


def test_dense_func_equals_varlen_on_equal_rows():
    q, k, v = torch.randn(3, 2, 7, 4, 16).bfloat16().unbind(0)                  # [B, S, H, d]
    cu = torch.tensor([0, 7, 14], dtype=torch.int32)
    varlen = fd.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 7, 7, causal=True)
    torch.testing.assert_close(fd.flash_attn_func(q, k, v, causal=True), varlen.view(q.shape))


@pytest.mark.parametrize("change, message", [
    (dict(q=lambda q: q.float()), "only supports fp16 and bf16"),
    (dict(k=lambda k: k.half()), "same dtype"),
    (dict(cu_q=lambda c: c.long()), "int32"),
    (dict(cu_q=lambda c: torch.stack([c, c], 1)[:, 0]), "contiguous"),
    (dict(max_q=lambda m: torch.tensor(float(m))), "Python int"),
    (dict(max_q=lambda m: torch.tensor([m])), "Python int"),
    (dict(max_q=lambda m: 2), "below the longest"),
    (dict(cu_k=lambda c: torch.tensor([0, 3, 5], dtype=torch.int32)), "rise from 0 to 6"),
])
def test_double_refuses_what_flash_attn_refuses(change, message):
    args = dict(q=torch.randn(6, 2, 8).bfloat16(), k=torch.randn(6, 2, 8).bfloat16(), v=torch.randn(6, 2, 8).bfloat16(),
                cu_q=torch.tensor([0, 2, 6], dtype=torch.int32), cu_k=torch.tensor([0, 2, 6], dtype=torch.int32),
                max_q=4, max_k=4)
    for name, fn in change.items():
        args[name] = fn(args[name])
    with pytest.raises(RuntimeError, match=message):
        fd.flash_attn_varlen_func(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], args["max_q"],
                                  args["max_k"], causal=True)


def test_unmodelled_options_are_refused_not_ignored():
    q = torch.randn(1, 4, 2, 8).bfloat16()
    with pytest.raises(NotImplementedError):
        fd.flash_attn_func(q, q, q, dropout_p=0.1)


@settings(max_examples=20)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 6), st.sampled_from([(4, 4), (4, 2)]), st.booleans())
def test_kvcache_matches_dense_reference(batch, new, cached, heads, append):
    """q [B, T, H, d] over a cache: the first cache_seqlens[b] entries (different per row), optionally after
    writing T new keys at cache_seqlens in place; bottom-right causal as in varlen."""
    h, h_kv = heads
    g = torch.Generator().manual_seed(batch * 100 + new * 10 + cached)
    capacity = cached + new + 2
    q = torch.randn(batch, new, h, 8, generator=g).bfloat16()
    k_cache, v_cache = (torch.randn(batch, capacity, h_kv, 8, generator=g).bfloat16() for _ in range(2))
    seqlens = torch.tensor([max(0, cached - b) for b in range(batch)], dtype=torch.int32)
    k_new, v_new = (torch.randn(batch, new, h_kv, 8, generator=g).bfloat16() for _ in range(2))
    before = k_cache.clone()
    out = fd.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new if append else None, v=v_new if append else None,
                                     cache_seqlens=seqlens, causal=True)
    for b in range(batch):
        n = int(seqlens[b])
        if append:
            assert torch.equal(k_cache[b, n:n + new], k_new[b]) and torch.equal(k_cache[b, :n], before[b, :n])
            n += new
        else:
            assert torch.equal(k_cache, before)
        torch.testing.assert_close(out[b].float(), dense_reference(q[b], k_cache[b, :n], v_cache[b, :n], True),
                                   atol=1e-2, rtol=1e-2)


def test_kvcache_without_seqlens_uses_the_whole_cache_and_refuses_a_strided_cache():
    q = torch.randn(2, 1, 2, 8).bfloat16()
    k, v = torch.randn(2, 2, 5, 2, 8).bfloat16().unbind(0)
    out = fd.flash_attn_with_kvcache(q, k, v, causal=True)
    torch.testing.assert_close(out[1].float(), dense_reference(q[1], k[1], v[1], causal=False), atol=1e-2, rtol=1e-2)
    strided = torch.randn(2, 5, 2, 16).bfloat16()[..., ::2]
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        fd.flash_attn_with_kvcache(q, strided, v, causal=True)
