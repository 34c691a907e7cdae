"""VAR's redistribution and sink measurements: the worked example, the properties that define the edit,
the threshold arithmetic at the course's width, and bad input."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sigma_ref as sr
from sigma_ref import data, evaluate, var
from sigma_ref.model import TinyMLLM

from conftest import tiny_config, tiny_model

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


# --- VAR inside a model: the edit reaches every layer's attention, prefill and decoding alike ---------------

def _trained_like_model(attention):
    torch.manual_seed(0)
    model = TinyMLLM(tiny_config(attention)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)                      # sharper attention than at init, so an edit shows
    return model


def _prompts():
    scenes = [s for s in data.load_split("test")[:12] if len(s["objects"]) == 2][:4]
    return data.collate([evaluate.prompt_of(data.encode(s)) for s in scenes])


@pytest.mark.parametrize("attention", ["standard", "gated", "sigma", "moda"])
def test_kernels_edit_the_probabilities_before_they_weight_the_values(attention):
    """With an edit that takes nothing (p = 0) the model computes what it computes without VAR; with p = 1
    and every token a sink, every row that looks at the image moves its weight (the outputs change)."""
    model, batch = _trained_like_model(attention), data.collate([data.encode(s) for s in data.load_split("test")[:4]])
    plain = model(batch).logits
    with var.redistributing(model, [0, 1], tau=-1.0, p=0.0):
        torch.testing.assert_close(model(batch).logits, plain, atol=1e-5, rtol=1e-5)
    with var.redistributing(model, [0, 1], tau=0.5, p=1.0, rho=0.0, floor=0.0):
        edited = model(batch).logits
    assert (edited - plain).abs().max() > 1e-3
    assert all(block.attn.probs_edit is None for block in model.blocks)            # undone on exit
    torch.testing.assert_close(model(batch).logits, plain, atol=0, rtol=0)


def test_the_math_kernel_applies_the_edit_as_written():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    ids = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 0, 0]] * 2)
    is_image, is_sink = ids == 1, torch.zeros_like(ids, dtype=torch.bool)
    is_sink[:, [0, 3]] = True
    edit = lambda probs: var.redistribute(probs, is_image, is_sink, p=0.5, rho=0.1, floor=0.1)
    _, probs = sr.sigma_attention(q, k, v, ids, 2, backend="math", return_probs=True)
    out, _ = sr.sigma_attention(q, k, v, ids, 2, backend="auto", edit=edit)
    torch.testing.assert_close(out, edit(probs) @ v, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="backend 'packed' returns no probabilities to edit"):
        sr.sigma_attention(q, k, v, ids, 2, backend="packed", edit=edit)


@pytest.mark.parametrize("attention", ["sigma", "moda"])
def test_generation_with_var_uses_the_prefill_sinks_and_decodes_with_the_edit(attention):
    model, prompts = _trained_like_model(attention), _prompts()
    plain = model.generate(prompts, 6)
    with var.redistributing(model, [0, 1], tau=-1.0, p=0.0):                     # nothing taken: as without VAR
        assert model.generate(prompts, 6) == plain
    seen = []
    with var.redistributing(model, [0, 1], tau=0.5, p=0.6, rho=0.0, floor=0.0):
        edit = model.blocks[1].attn.probs_edit
        model.blocks[1].attn.probs_edit = lambda probs: (seen.append(tuple(probs.shape)), edit(probs))[1]
        model.generate(prompts, 3)
    S = prompts["tokens"].shape[1]
    assert seen[0][-2:] == (S, S) and [shape[-2:] for shape in seen[1:]] == [(1, S + 1), (1, S + 2)]


def test_redistributing_names_bad_arguments():
    model = _trained_like_model("sigma")
    with pytest.raises(ValueError, match=r"p must be a finite number in 0\.\.1, got 2"):
        with var.redistributing(model, [0], tau=1.0, p=2):
            pass
    with pytest.raises(ValueError, match=r"layers entry must be an int in 0\.\.1"):
        with var.redistributing(model, [0], tau=1.0, layers=[2]):
            pass


def test_the_var_study_runs_on_a_tiny_compare_run_and_writes_its_results(tmp_path, monkeypatch):
    from sigma_ref import train as T
    from sigma_ref.lab import experiments, var_study
    monkeypatch.setitem(T.PRESETS, "tiny", T.TrainConfig(tiny_config(), steps=6, batch_size=8, warmup_steps=2,
                                                          eval_every=3, eval_samples=8, checkpoint_every=3))
    experiments.ensure_trained("tiny", [0], tmp_path / "runs", workers=1, progress=False)
    monkeypatch.setattr(var_study, "CAPTION_SCENES", 6)
    monkeypatch.setattr(var_study, "GRID", [(0.4, 0.5)])
    studies = var_study.run_var_study(tmp_path / "runs", 1, tmp_path / "out", workers=1, progress=False)
    assert {s["attention"] for s in studies["compare"]} == set(experiments.ATTENTION_KINDS)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["tau"] == pytest.approx(var.equivalent_tau(32))
    for study in written["compare"]:
        assert len(study["dims"]) == 2 and set(study["caption"]["var"]) == {"p=0.4 rho=0.5"}
        assert study["confirmation"]["visual_sinks"] >= 0
    assert (tmp_path / "out" / "phi_distributions.png").exists() and "recur on every seed" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match="runs: no checkpoint at"):
        var_study.run_var_study(tmp_path / "nowhere", 1, tmp_path / "out2", workers=1, progress=False)


def test_exact_match_without_decoding_refuses_a_model_under_var():
    """Under VAR the sinks are found at the prefill; a teacher-forced pass would find them among the caption's
    tokens too, which decoding never does, so exact_match refuses and evaluate() (which decodes) is the way."""
    model = tiny_model("sigma")
    scenes = data.load_split("validation")[:4]
    with var.redistributing(model, [0, 1], tau=0.5, layers=[1]):
        with pytest.raises(ValueError, match="probs_edit"):
            evaluate.exact_match(model, scenes)
        evaluate.evaluate(model, scenes)
    assert evaluate.exact_match(model, scenes)["exact_match"] == evaluate.evaluate(model, scenes)["exact_match"]
