"""Every backend computes the same function: the contract in kernels.py's docstring."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sigma_ref as sr
from sigma_ref import kernels
from sigma_ref.kernels import flash
from sigma_ref.testing import flash_double
from conftest import modality_rows

TRAINABLE_CPU_BACKENDS = ["sdpa", "packed"]


def random_qkv(ids, heads=2, dim=8, seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    B, S = ids.shape
    return [torch.randn(B, heads, S, dim, generator=g, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def by_definition(q, k, v, ids):
    """Grouped causal attention one query at a time: the plainest possible reading of the contract."""
    out = torch.zeros_like(q)
    B, H, S, d = q.shape
    for b in range(B):
        for i in range(S):
            keys = [j for j in range(i + 1) if ids is None or ids[b, j] == ids[b, i]]
            scores = q[b, :, i, None, :] @ k[b, :, keys].transpose(-2, -1) / d ** 0.5   # [H, 1, n]
            out[b, :, i] = (scores.softmax(-1) @ v[b, :, keys])[:, 0]
    return out


@given(modality_rows(max_batch=2, max_len=24))
def test_math_equals_definition(ids):
    q, k, v = random_qkv(ids)
    for groups in (ids, None):
        out, probs = sr.grouped_causal_attention(q, k, v, groups, backend="math", return_probs=True)
        torch.testing.assert_close(out, by_definition(q, k, v, groups), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


@given(modality_rows(), st.sampled_from([True, False]), st.integers(1, 3))
def test_backends_agree_forward_and_backward(ids, grouped, heads):
    groups = ids if grouped else None
    q, k, v = random_qkv(ids, heads=heads, requires_grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    reference, _ = sr.grouped_causal_attention(q, k, v, groups, backend="math")
    reference_grads = torch.autograd.grad((reference * weight).sum(), (q, k, v))
    for backend in TRAINABLE_CPU_BACKENDS + ["auto"]:
        out, _ = sr.grouped_causal_attention(q, k, v, groups, backend=backend)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend}: {m}")
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        for name, grad, ref in zip("qkv", grads, reference_grads):
            torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend} d{name}: {m}")


@given(modality_rows(max_len=40), st.integers(1, 4), st.data())
def test_sigma_attention_matches_per_head_masks(ids, heads, data):
    split = data.draw(st.integers(0, heads))
    q, k, v = random_qkv(ids, heads=heads)
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    masked = scores.masked_fill(~sr.sigma_mask(ids, heads, split), float("-inf"))
    expected = masked.softmax(-1) @ v
    for backend in ["math", "sdpa", "packed"]:
        out, _ = sr.sigma_attention(q, k, v, ids, split, backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=8)
@given(modality_rows(max_batch=2, max_len=40), st.integers(0, 2))
def test_flex_forward_matches_math(ids, split):
    q, k, v = random_qkv(ids, heads=2, dim=16)
    expected, _ = sr.sigma_attention(q, k, v, ids, split, backend="math")
    with torch.no_grad():
        out, _ = sr.sigma_attention(q, k, v, ids, split, backend="flex")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=10)
@given(st.integers(1, 2), st.integers(1, 40), st.integers(3, 5), st.data())
def test_every_backend_takes_more_than_two_groups(batch, seq_len, num_groups, data):
    """The contract says "groups", not "modalities": any non-negative ids, e.g. one group per image."""
    ids = torch.tensor([data.draw(st.lists(st.integers(0, num_groups - 1), min_size=seq_len, max_size=seq_len))
                        for _ in range(batch)])
    q, k, v = random_qkv(ids, heads=2, dim=16)
    expected = by_definition(q, k, v, ids)
    with torch.no_grad():
        for backend in ["math", "sdpa", "packed", "flex"]:
            out, _ = sr.grouped_causal_attention(q, k, v, ids, backend=backend)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend}: {m}")


def test_grouped_errors_name_group_ids():
    q = torch.randn(1, 2, 4, 8)
    for backend in ["math", "sdpa", "packed", "flex"]:
        with pytest.raises(ValueError, match="^group_ids must be >= 0"):
            with torch.no_grad():
                sr.grouped_causal_attention(q, q, q, torch.tensor([[0, 1, -1, 2]]), backend=backend)


def test_flex_refuses_backward_on_cpu_with_a_clear_message():
    ids = sr.layout("T3 I5")[None]
    q, k, v = random_qkv(ids, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only on CPU.*packed"):
        sr.grouped_causal_attention(q, k, v, ids, backend="flex")


# --- flash: the packing around flash-attn, run on CPU through the seam and the flash-attn double ----------

FLASH_FLAVOURS = {"flash-attn": flash_double, "torch varlen_attn": flash_double.torch_varlen}


@pytest.mark.parametrize("flavour", FLASH_FLAVOURS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(ids=modality_rows(max_len=48), grouped=st.sampled_from([True, False]))
@settings(max_examples=20)
def test_flash_packing_through_the_double(flavour, dtype, ids, grouped):
    """Both implementations the flash backend can find on CUDA: flash-attn's functions, and torch's own
    varlen_attn wrapped as flash.py wraps it (feature detection picks one; the seam takes either)."""
    groups = ids if grouped else None
    q, k, v = random_qkv(ids, heads=2, dim=8, dtype=dtype, requires_grad=True)
    # Reference: the exact fp32 answer on the same (rounded) inputs; the double computes in fp32 and rounds
    # once at the end, so the only difference is one rounding to the half-precision output.
    reference, _ = sr.grouped_causal_attention(q.float(), k.float(), v.float(), groups, backend="math")
    flash_double.calls.clear()
    with flash.substitute(FLASH_FLAVOURS[flavour]):
        out, _ = sr.grouped_causal_attention(q, k, v, groups, backend="flash")
        assert kernels.resolve_backend("auto", q) == "flash"
    assert set(flash_double.calls) == ({"varlen_attn", "flash_attn_varlen_func"} if flavour == "torch varlen_attn"
                                       else {"flash_attn_varlen_func" if grouped else "flash_attn_func"})
    assert out.dtype == dtype and out.shape == q.shape
    tolerance = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), reference, atol=tolerance, rtol=tolerance)
    out.float().sum().backward()                      # gradients flow through the packing
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_segments_for_flash_varlen():
    ids = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    seg = kernels.GroupLayout.of(ids, 2, 5, "cpu").segments()
    # row 0: text at 0,3,4 ; image at 1,2 ; row 1: image only (its empty text segment is dropped)
    assert seg.order.tolist() == [0, 3, 4, 1, 2, 5, 6, 7, 8, 9]
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 10]
    assert seg.cu_seqlens.dtype == torch.int32 and seg.cu_seqlens.is_contiguous()
    assert seg.max_len == 5 and isinstance(seg.max_len, int)
    assert seg.rank.flatten().tolist() == [0, 0, 1, 1, 2, 0, 1, 2, 3, 4]


def test_segments_leave_right_padding_out():
    ids = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    seg = kernels.GroupLayout.of(ids, 2, 5, "cpu", valid).segments()
    assert seg.order.tolist() == [0, 3, 4, 1, 2, 6, 5, 7]              # tokens 8 and 9 are padding
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 6, 8]


def test_flash_errors_name_the_alternative():
    ids = sr.layout("T2 I2")[None]
    q, k, v = random_qkv(ids, dim=8)
    with pytest.raises(ValueError, match="needs CUDA tensors, got tensors on cpu.*packed"):
        sr.grouped_causal_attention(q, k, v, ids, backend="flash")
    with flash.substitute(flash_double, allow_cpu=False):
        with pytest.raises(ValueError, match="needs CUDA tensors.*cpu.*packed"):
            sr.grouped_causal_attention(q, k, v, ids, backend="flash")
    with flash.substitute(flash_double):
        with pytest.raises(ValueError, match="float16 and bfloat16 only, got torch.float32.*sdpa"):
            sr.grouped_causal_attention(q, k, v, ids, backend="flash")
        big = torch.randn(1, 1, 4, 264, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="head_dim <= 256, got 264"):
            sr.grouped_causal_attention(big, big, big, ids, backend="flash")
        assert kernels.resolve_backend("auto", q) in ("sdpa", "packed")    # fp32: auto avoids flash
    with pytest.raises(ValueError, match="must define flash_attn_varlen_func.*or varlen_attn"):
        with flash.substitute(object()):
            pass


# --- the auto choice and input checks ------------------------------------------------------------------

def test_auto_picks_by_measured_crossover():
    short = torch.zeros(1, 1, kernels.PACKED_MIN_LENGTH - 1, 8)
    long = torch.zeros(1, 1, kernels.PACKED_MIN_LENGTH, 8)
    assert kernels.resolve_backend("auto", short) == "sdpa"
    assert kernels.resolve_backend("auto", long) == "packed"
    assert kernels.resolve_backend("auto", long, return_probs=True) == "math"


def test_probs_only_from_math():
    ids = sr.layout("T2 I2")[None]
    q, k, v = random_qkv(ids)
    with pytest.raises(ValueError, match="return_probs=True needs backend='math'"):
        sr.grouped_causal_attention(q, k, v, ids, backend="packed", return_probs=True)


@pytest.mark.parametrize("make, message", [
    (lambda q: dict(q=q[0]), "q must be a 4-D tensor"),
    (lambda q: dict(k=q[:, :1]), "same shape"),
    (lambda q: dict(group_ids=torch.zeros(1, 3, dtype=torch.long)), r"group_ids must have shape .*\[batch, seq\] = \[1, 4\], got \[1, 3\]"),
    (lambda q: dict(group_ids=torch.zeros(1, 4)), "group_ids must be an integer tensor"),
    (lambda q: dict(backend="fast"), "backend must be one of"),
])
def test_kernel_input_errors(make, message):
    q = torch.randn(1, 2, 4, 8)
    args = dict(q=q, k=q, v=q, group_ids=torch.zeros(1, 4, dtype=torch.long), backend="math")
    args.update(make(q))
    with pytest.raises(ValueError, match=message):
        sr.grouped_causal_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_dense_mask_reuse_never_serves_a_stale_mask():
    """The per-forward mask cache must notice an in-place change of the ids and a different split."""
    ids = torch.tensor([[0, 0, 1, 1, 0, 1]])
    q, k, v = random_qkv(ids, heads=4)
    first, _ = sr.sigma_attention(q, k, v, ids, 2, backend="sdpa")
    ids[0, 2] = 0                                            # in place: same object, new version
    expected, _ = sr.sigma_attention(q, k, v, ids, 2, backend="math")
    torch.testing.assert_close(sr.sigma_attention(q, k, v, ids, 2, backend="sdpa")[0], expected)
    expected3, _ = sr.sigma_attention(q, k, v, ids, 3, backend="math")
    torch.testing.assert_close(sr.sigma_attention(q, k, v, ids, 3, backend="sdpa")[0], expected3)
    assert not torch.allclose(first, expected)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu autograd Function", "composition (CUDA's path)"])
@pytest.mark.parametrize("num_intra_heads", [2, 3])
def test_packed_path_with_every_token_padding(fused, num_intra_heads):
    """A batch that is all padding has no segment to pack: zeros out and zero gradients (the composition
    once raised an index_select error here, and with every head intra once returned zeros outside the graph,
    so that asking for their gradients raised, where `math` gives zeros)."""
    ids = torch.tensor([[0, 1, 1]])
    q, k, v = random_qkv(ids, heads=3, requires_grad=True)
    with mock.patch.object(kernels.packed, "fused_supported", lambda q: fused):
        out, _ = sr.sigma_attention(q, k, v, ids, num_intra_heads, backend="packed",
                                    valid=torch.zeros(1, 3, dtype=torch.bool))
        grads = torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v))
    assert (out == 0).all() and all((g == 0).all() for g in grads)


@given(st.lists(st.integers(1, 3000), max_size=12), st.integers(1, 4096))
def test_grid_members_partition_the_segments_and_split_only_long_uneven_ones(lengths, split_from):
    grids = kernels.packed.grid_members(lengths, split_from)
    assert sorted(i for grid in grids for i in grid) == list(range(len(lengths)))
    assert all(grid == sorted(grid) for grid in grids)
    longest = [max(lengths[i] for i in grid) for grid in grids]
    for grid, top in zip(grids, longest):
        # a grid padded to `top` holds no segment at most half as long, once `top` is long enough to split
        assert top < split_from or all(2 * lengths[i] > top for i in grid)
    # a new grid starts only where the previous one was long enough to split and the new one at most half
    assert all(before >= split_from and 2 * after <= before for before, after in zip(longest, longest[1:]))


def test_a_short_segment_beside_a_long_one_gets_its_own_grid():
    """The Hugging Face benchmark's layout: 1536 text and 512 image tokens in one row. One grid would pad the
    image to 1536 (nine times its causal pairs); training batches (segments of tens of tokens) keep one."""
    assert kernels.packed.grid_members([1536, 512]) == [[0], [1]]
    assert kernels.packed.grid_members([1536, 1000, 512, 200]) == [[0, 1], [2], [3]]
    assert kernels.packed.grid_members([20, 16, 13, 5]) == [[0, 1, 2, 3]]
    ids = torch.cat([torch.zeros(600, dtype=torch.long), torch.ones(200, dtype=torch.long)])[None]
    plan = kernels.packed.pack_plan(kernels.GroupLayout.of(ids, 1, 800, "cpu"))
    assert [grid.shape for grid in plan.grids] == [(1, 600), (1, 200)]


@pytest.mark.parametrize("split_from", [kernels.packed.SPLIT_FROM, 1],
                         ids=["grids as split in use", "a grid per length"])
@pytest.mark.parametrize("fused", [True, False], ids=["cpu autograd Function", "composition (CUDA's path)"])
@given(modality_rows(max_len=40), st.integers(1, 4), st.data())
def test_packed_sigma_attention_matches_math_in_values_and_gradients(split_from, fused, ids, heads, data):
    """The packed backend against `math`, values and gradients, for every split and right padding: the CPU
    autograd Function (head chunks of any size) and the plain composition that CUDA tensors take; with the
    segments in one grid (as at these lengths), and split into grids wherever one is half another's length."""
    split = data.draw(st.integers(0, heads), label="num_intra_heads")
    batch, seq_len = ids.shape
    lengths = data.draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch), label="lengths")
    valid = torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]
    threads = data.draw(st.integers(1, 3), label="threads")            # the backward's head chunks follow them
    q, k, v = random_qkv(ids, heads=heads, requires_grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    with sr.runtime.torch_threads(threads), mock.patch.object(kernels.packed, "fused_supported", lambda q: fused), \
            mock.patch.object(kernels.packed, "SPLIT_FROM", split_from):
        for backend in ("math", "packed"):
            out, _ = sr.sigma_attention(q, k, v, ids, split, backend=backend, valid=valid)
            results[backend] = (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))
    for name, got, expected in zip(["out", "dq", "dk", "dv"], results["packed"], results["math"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert (results["packed"][0].transpose(1, 2)[~valid] == 0).all()       # zeros at padding
