"""VAR's redistribution and sink measurements: the worked example, the properties that define the edit,
the threshold arithmetic at the course's width, and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sigma_ref import var

WORKED_ROW = torch.tensor([0.30, 0.10, 0.05, 0.25, 0.20, 0.10])            # text sink, 2 text, visual sink, 2 image
WORKED_IMAGE = torch.tensor([[False, False, False, True, True, True]])
WORKED_SINK = torch.tensor([[True, False, False, True, False, False]])


def test_the_worked_example():
    edited = var.redistribute(WORKED_ROW[None, None, None], WORKED_IMAGE, WORKED_SINK, p=0.4, rho=0.5)
    torch.testing.assert_close(edited[0, 0, 0], torch.tensor([0.18, 0.10, 0.05, 0.15, 0.3467, 0.1733]),
                               atol=1e-4, rtol=0)
    unchanged = var.redistribute(WORKED_ROW[None, None, None], WORKED_IMAGE, WORKED_SINK, p=0.4, rho=0.8)
    assert torch.equal(unchanged, WORKED_ROW[None, None, None])                # r = 0.545 < 0.8: not selected


@st.composite
def attention_rows(draw):
    """probs [B, H, Q, S] (causal rows summing to 1) with image and sink masks over the keys."""
    batch, heads, seq = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, seq, seq, generator=g) * 2
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    is_image = torch.rand(batch, seq, generator=g) < draw(st.floats(0.2, 0.9))
    is_sink = torch.rand(batch, seq, generator=g) < draw(st.floats(0.0, 0.4))
    return probs, is_image, is_sink


parameters = st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))


@settings(max_examples=60, deadline=None)
@given(attention_rows(), parameters)
def test_the_edit_keeps_rows_text_entries_and_image_ratios(rows, params):
    probs, is_image, is_sink = rows
    p, rho, floor = params
    edited = var.redistribute(probs, is_image, is_sink, p=p, rho=rho, floor=floor)
    torch.testing.assert_close(edited.sum(-1), probs.sum(-1), atol=1e-5, rtol=0)          # rows still sum to 1
    assert bool((edited >= 0).all())
    plain_text = (~is_image & ~is_sink)[:, None, None, :].expand_as(probs)
    assert torch.equal(edited[plain_text], probs[plain_text])                            # non-sink text untouched
    plain_image = (is_image & ~is_sink)[:, None, None, :]
    # Among non-sink image tokens every ratio is kept: edited / original is one factor per row.
    factor = torch.where(plain_image & (probs > 1e-6), edited / probs.clamp_min(1e-12), torch.nan)
    spread = factor.nan_to_num(0).amax(-1) - torch.where(factor.isnan(), torch.inf, factor).amin(-1)
    finite = torch.isfinite(spread)
    assert bool((spread[finite] < 1e-4).all())


@settings(max_examples=30, deadline=None)
@given(attention_rows(), parameters)
def test_without_sinks_the_edit_is_the_identity(rows, params):
    probs, is_image, _ = rows
    p, rho, floor = params
    assert torch.equal(var.redistribute(probs, is_image, torch.zeros_like(is_image), p, rho, floor), probs)


@settings(max_examples=30, deadline=None)
@given(attention_rows())
def test_a_batch_is_edited_as_each_row_alone(rows):
    probs, is_image, is_sink = rows
    batched = var.redistribute(probs, is_image, is_sink)
    for b in range(probs.shape[0]):
        for h in range(probs.shape[1]):
            for q in range(probs.shape[2]):
                alone = var.redistribute(probs[b:b + 1, h:h + 1, q:q + 1], is_image[b:b + 1], is_sink[b:b + 1])
                assert torch.equal(batched[b, h, q], alone[0, 0, 0])


def test_phi_never_exceeds_the_square_root_of_the_width_so_the_published_tau_cannot_fire_at_64():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2000, 64, generator=g)
    states[:, 5] *= 1000                                                         # one coordinate dominates
    phi = var.sink_values(states, [5, 9])
    assert float(phi.max()) <= math.sqrt(64) + 1e-4 and float(phi.max()) > 7.9
    assert float(phi.max()) < var.PUBLISHED_TAU
    assert var.equivalent_tau(64) == pytest.approx(2.5)
    assert 0.015 < var.isotropic_exceedance(2.5, 64, num_dims=2) < 0.035              # a few percent pass by chance


def test_planted_massive_dimensions_are_found():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3000, 64, generator=g)
    sinks = torch.randperm(3000, generator=g)[:40]
    hidden[sinks[:20], 11] = 40.0
    hidden[sinks[20:], 47] = -40.0
    dims, scores = var.find_sink_dimensions(hidden, count=2)
    assert sorted(dims) == [11, 47] and scores.shape == (64,)
    assert float(var.sink_values(hidden[sinks], dims).min()) > 5                        # the sinks stand out
    assert float((var.sink_values(hidden, dims) > 5).float().mean()) < 0.02


@pytest.mark.parametrize("change, message", [
    (dict(p=1.5), r"p must be a finite number in 0\.\.1, got 1\.5"),
    (dict(rho=-0.1), r"rho must be a finite number in 0\.\.1, got -0\.1"),
    (dict(floor=2), r"floor must be a finite number in 0\.\.1, got 2"),
    (dict(is_image=torch.ones(1, 5, dtype=torch.bool)), r"is_image must be a bool tensor \[batch, keys\] = \[1, 6\]"),
    (dict(is_sink=torch.ones(1, 6)), r"is_sink must be a bool tensor"),
    (dict(probs=WORKED_ROW[None, None, None] * 2), r"probs must be probabilities: rows >= 0 summing to 1"),
    (dict(probs=WORKED_ROW[None, None]), r"probs must be a float tensor \[batch, heads, queries, keys\]"),
])
def test_bad_input_is_named(change, message):
    arguments = dict(probs=WORKED_ROW[None, None, None], is_image=WORKED_IMAGE, is_sink=WORKED_SINK)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        var.redistribute(**arguments)


def test_bad_sink_measurements_are_named():
    with pytest.raises(ValueError, match=r"dims must be a non-empty list of ints in 0\.\.63, got \[64\]"):
        var.sink_values(torch.randn(3, 64), [64])
    with pytest.raises(ValueError, match=r"hidden must be a float tensor \[tokens, D\]"):
        var.find_sink_dimensions(torch.randn(2, 3, 64))
