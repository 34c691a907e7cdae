"""Probes on tiny hand-made models whose answers are known."""

import math

import numpy as np
import pytest
import torch

from sigma_ref import data as D
from sigma_ref import evaluate, probes
from sigma_ref.model import TinyMLLM

from conftest import tiny_config


def model(attention="sigma", split=None, layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = TinyMLLM(tiny_config(attention, num_layers=layers, num_intra_heads=split, **kw)).eval()
    with torch.no_grad():              # larger weights than the init, so every effect is far from rounding
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return m


BATCH = probes.probe_batch(size=12)


def test_only_intra_heads_means_no_contamination_anywhere():
    c = probes.contamination(model(split=4, layers=3), BATCH)
    assert np.all(c["intra"] == 0) and np.all(c["residual"] == 0)
    assert np.all(np.isnan(c["global"]))                          # no global stream at all
    mass = probes.cross_modal_mass(model(split=4), BATCH)
    assert np.all(mass["text_to_image"] == 0) and np.all(mass["image_to_text"] == 0)


def test_only_global_heads_are_contaminated():
    for attention in ("standard", "gated"):
        c = probes.contamination(model(attention), BATCH)
        assert np.all(np.isnan(c["intra"]))
        assert np.all(c["global"] > 1e-3) and np.all(c["residual"] > 1e-3)
        assert np.all(probes.cross_modal_mass(model(attention), BATCH)["text_to_image"] > 0)


def test_sigma_is_pure_at_layer_zero_and_contaminated_after_it():
    """What the seed glosses over: from layer 1 on, the intra stream reads image information second-hand."""
    c = probes.contamination(model(split=2, layers=3), BATCH)
    assert c["intra"][0] == 0
    assert np.all(c["intra"][1:] > 1e-3)
    assert np.all(c["residual"] > 1e-3) and np.all(c["global"] > 1e-3)
    mass = probes.cross_modal_mass(model(split=2), BATCH)
    assert mass["streams"] == ["intra", "intra", "global", "global"]
    assert np.all(mass["text_to_image"][:, :2] == 0) and np.all(mass["text_to_image"][:, 2:] > 0)


def test_gate_means_with_zero_gate_weights_equal_sigmoid_of_bias():
    bias = ((2.0, -0.5), (-1.5, 1.0))
    m = model(bias_init=bias)
    with torch.no_grad():
        for block in m.blocks:
            block.attn.gate_intra_proj.weight.zero_()
            block.attn.gate_global_proj.weight.zero_()
    for layer in probes.gate_means(m, BATCH):
        for s, stream in enumerate(("intra", "global")):
            for j, modality in enumerate(("text", "image")):
                assert math.isclose(layer[stream][modality], 1 / (1 + math.exp(-bias[s][j])), rel_tol=1e-6)
    assert probes.gate_means(model("standard"), BATCH) == [{}, {}]
    assert set(probes.gate_means(model("gated"), BATCH)[0]) == {"global"}


def test_uniform_attention_gives_the_known_sink_fraction():
    """With q = 0 every query attends uniformly to its i+1 keys, so the first key gets 1/(i+1)."""
    m = model("standard", layers=1)
    with torch.no_grad():
        m.blocks[0].attn.q_proj.weight.zero_()
    batch = D.collate([D.encode(s) for s in D.load_split("test")[:1]])
    n = batch["tokens"].shape[1]
    expected = np.mean([1 / (i + 1) for i in range(1, n)])
    sinks = probes.attention_sinks(m, batch)
    assert math.isclose(sinks["first_token"][0], expected, rel_tol=1e-5)
    assert math.isclose(sinks["uniform_baseline"][0], expected, rel_tol=1e-5)
    assert sinks["max_activation"][0] > 0


def test_the_sink_measure_counts_only_pairs_that_can_see_the_first_token():
    """SIGMA with q = 0 attends uniformly over what each head's mask allows: the measure equals its uniform
    baseline, and an intra head's image queries (which cannot see the text token 0) are left out: counting
    them as 0 would give less."""
    m = model("sigma", layers=1)
    with torch.no_grad():
        m.blocks[0].attn.q_proj.weight.zero_()
    batch = D.collate([D.encode(s) for s in D.load_split("test")[:3]])
    sinks = probes.attention_sinks(m, batch)
    assert math.isclose(sinks["first_token"][0], sinks["uniform_baseline"][0], rel_tol=1e-5)
    with probes.math_backend(m):
        probs = m(batch, return_details=True).details[0].attn_probs[..., 0]           # [B, H, S]
    real = probes.real_tokens(batch).clone()
    real[:, 0] = False
    every_pair = probs.permute(1, 0, 2)[:, real].mean().item()                         # the old, diluted count
    assert every_pair < sinks["first_token"][0] - 0.01


def test_token_gates_and_word_classes():
    m = model()
    tg = probes.token_gates(m, BATCH, row=0)
    n = int(probes.real_tokens(BATCH)[0].sum())
    assert len(tg["tokens"]) == n and tg["tokens"].count("img") == 16
    assert tg["intra"].shape == tg["global"].shape == (2, n)
    classes = probes.gate_by_word_class(m, BATCH)
    assert classes["content"].shape == (2,) and np.all((0 < classes["content"]) & (classes["content"] < 1))
    with pytest.raises(ValueError, match="no gate"):
        probes.gate_by_word_class(model("standard"), BATCH)


def test_dilution_structure():
    result = evaluate.dilution(model(), D.load_split("text_only")[:4], counts=(0, 16), kinds=("blank",))
    assert set(result["blank"]) == {0, 16}
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in result["blank"].values())


def test_math_backend_context_restores_the_backend():
    m = model(backend="sdpa")
    with probes.math_backend(m):
        assert all(b.attn.config.backend == "math" for b in m.blocks)
    assert all(b.attn.config.backend == "sdpa" for b in m.blocks)
