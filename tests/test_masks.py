import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sigma_ref as sr
from conftest import modality_rows


def brute_force_intra(ids):
    """intra_mask by definition, one entry at a time."""
    n = len(ids)
    return torch.tensor([[j <= i and ids[i] == ids[j] for j in range(n)] for i in range(n)])


def test_constants():
    assert (sr.TEXT, sr.IMAGE) == (0, 1)


def test_layout_example():
    ids = sr.layout("T4 I16 T8")
    assert ids.dtype == torch.long and ids.shape == (28,)
    assert ids.tolist() == [0] * 4 + [1] * 16 + [0] * 8


@given(st.lists(st.tuples(st.sampled_from("TI"), st.integers(1, 20)), min_size=1, max_size=8))
def test_layout_round_trips(parts):
    spec = " ".join(f"{letter}{count}" for letter, count in parts)
    ids = sr.layout(spec)
    assert len(ids) == sum(count for _, count in parts)
    assert sr.layout(sr.layout_string(ids)).tolist() == ids.tolist()


@pytest.mark.parametrize("spec", ["", "   ", "T", "X4", "T0", "T-1", "t4", "T4I4", "T4, I4", "4T", "T4 I", "T1.5"])
def test_layout_rejects_malformed(spec):
    with pytest.raises(ValueError, match="layout"):
        sr.layout(spec)


def test_layout_rejects_non_string():
    with pytest.raises(ValueError, match="spec"):
        sr.layout(["T4"])


@given(st.integers(1, 40))
def test_causal_mask_is_lower_triangle(n):
    mask = sr.causal_mask(n)
    expected = torch.tensor([[j <= i for j in range(n)] for i in range(n)])
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


@pytest.mark.parametrize("n", [0, -3, 2.0, True])
def test_causal_mask_rejects_bad_n(n):
    with pytest.raises(ValueError, match="causal_mask: n must be an int >= 1"):
        sr.causal_mask(n)


@given(modality_rows())
def test_intra_mask_equals_brute_force(ids):
    batched = sr.intra_mask(ids)
    assert batched.shape == (ids.shape[0], ids.shape[1], ids.shape[1])
    for row, mask in zip(ids, batched):
        assert torch.equal(mask, brute_force_intra(row.tolist()))
        assert torch.equal(sr.intra_mask(row), mask)          # the 1-D form agrees


@given(modality_rows(max_batch=2, max_len=24), st.integers(1, 6), st.data())
def test_sigma_mask_per_head(ids, num_heads, data):
    split = data.draw(st.integers(0, num_heads))
    mask = sr.sigma_mask(ids, num_heads, split)
    assert mask.shape == (ids.shape[0], num_heads, ids.shape[1], ids.shape[1])
    causal = sr.causal_mask(ids.shape[1])
    for b in range(ids.shape[0]):
        for h in range(num_heads):
            expected = brute_force_intra(ids[b].tolist()) if h < split else causal
            assert torch.equal(mask[b, h], expected)


@given(modality_rows(max_batch=2, max_len=20), st.integers(0, 4))
def test_mask_mods_match_dense_masks(ids, split):
    B, n = ids.shape
    q = torch.arange(n)[:, None].expand(n, n)
    k = torch.arange(n)[None, :].expand(n, n)
    dense = sr.sigma_mask(ids, 4, split)
    mod = sr.sigma_mask_mod(ids, split)
    intra = sr.intra_mask_mod(ids)
    for b in range(B):
        assert torch.equal(sr.causal_mask_mod(b, 0, q, k), sr.causal_mask(n))
        assert torch.equal(intra(torch.tensor(b), 0, q, k), sr.intra_mask(ids[b]))
        for h in range(4):
            assert torch.equal(mod(torch.tensor(b), torch.tensor(h), q, k), dense[b, h])


def test_intra_mask_text_never_sees_image():
    ids = sr.layout("T2 I3 T2")
    mask = sr.intra_mask(ids)
    text, image = ids == sr.TEXT, ids == sr.IMAGE
    assert not mask[text][:, image].any() and not mask[image][:, text].any()


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0, 2, 1]), "value 2"),
    (torch.tensor([0, -1]), "value -1"),
    (torch.tensor([0.0, 1.0]), "integer dtype"),
    (torch.tensor([True, False]), "integer dtype"),
    ([0, 1], "torch.Tensor"),
    (torch.zeros(0, dtype=torch.long), "at least one position"),
])
def test_intra_mask_rejects_bad_ids(bad, message):
    with pytest.raises(ValueError, match=message) as error:
        sr.intra_mask(bad)
    assert "modality_ids" in str(error.value)


def test_sigma_mask_rejects_bad_split():
    with pytest.raises(ValueError, match="num_intra_heads"):
        sr.sigma_mask(sr.layout("T2 I2"), 4, 5)
