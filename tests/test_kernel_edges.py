"""The kernels at their edges: ids made under inference mode, probabilities asked of a backend that has none,
right padding, and flex compiling few shapes over many lengths."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sigma_ref as sr
from sigma_ref import data as D
from conftest import tiny_model


# --- inference mode: ids made inside torch.inference_mode() (a serving loop) ------------------------------

@pytest.mark.parametrize("backend", ["auto", "sdpa", "packed", "math"])
def test_sigma_attention_and_model_run_under_inference_mode(backend):
    layer = sr.SigmaAttention(sr.AttentionConfig(hidden_size=32, num_heads=4, backend=backend)).eval()
    model = tiny_model(backend=backend)
    batch = D.collate([D.encode(s) for s in D.load_split("test")[:3]])
    with torch.inference_mode():
        ids = sr.layout("T3 I5 T4")
        y = layer(torch.randn(2, 12, 32), ids)
        logits = model({k: v.clone() for k, v in batch.items()}).logits
    assert y.shape == (2, 12, 32) and torch.isfinite(logits).all()


# --- return_probs is refused by every backend that cannot form the probabilities --------------------------

@pytest.mark.parametrize("backend", ["sdpa", "packed", "flex"])
def test_sigma_attention_refuses_return_probs_like_grouped(backend):
    q = torch.randn(1, 4, 6, 8)
    ids = sr.layout("T2 I2 T2")[None]
    for call in (lambda: sr.sigma_attention(q, q, q, ids, 2, backend=backend, return_probs=True),
                 lambda: sr.grouped_causal_attention(q, q, q, ids, backend=backend, return_probs=True)):
        with pytest.raises(ValueError, match="return_probs=True needs backend='math'"):
            call()


# --- right padding is never packed, and every backend returns zeros there --------------------------------

@given(st.lists(st.integers(1, 20), min_size=1, max_size=3), st.integers(0, 4), st.data())
def test_padding_is_zero_and_backends_agree(lengths, split, data):
    seq_len = max(lengths)
    ids = torch.tensor([data.draw(st.lists(st.integers(0, 1), min_size=seq_len, max_size=seq_len)) for _ in lengths])
    valid = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    q, k, v = torch.randn(3, len(lengths), 4, seq_len, 8).unbind(0)
    reference, _ = sr.sigma_attention(q, k, v, ids, split, backend="math", valid=valid)
    assert torch.all(reference[~valid[:, None, :, None].expand_as(reference)] == 0)
    for backend in ("sdpa", "packed"):
        out, _ = sr.sigma_attention(q, k, v, ids, split, backend=backend, valid=valid)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_valid_must_be_right_padding():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="valid must mark right padding only"):
        sr.sigma_attention(q, q, q, torch.zeros(4, dtype=torch.long), 1, valid=torch.tensor([[True, False, True, True]]))


# --- flex: many lengths compile few shapes (a static compile per length hits torch's recompile limit) ------

@pytest.mark.slow
def test_flex_compiles_few_shapes_over_many_lengths():
    from torch._dynamo.utils import counters

    from sigma_ref.kernels import flex

    if not flex.compiler_available():
        pytest.skip("no C++ compiler: flex runs eagerly")
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for n in range(20, 32):                       # 12 distinct lengths, past the recompile limit of 8
            q, k, v = torch.randn(3, 1, 2, n, 16).unbind(0)
            ids = torch.randint(0, 2, (1, n), generator=torch.Generator().manual_seed(n))
            out, _ = sr.sigma_attention(q, k, v, ids, 1, backend="flex")
            torch.testing.assert_close(out, sr.sigma_attention(q, k, v, ids, 1, backend="math")[0], atol=1e-5, rtol=1e-5)
    assert {flex.padded_length(n) for n in range(20, 32)} == {128}
    assert counters["stats"]["unique_graphs"] - before <= 2
