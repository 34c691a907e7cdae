"""Figures are made headlessly and their data functions are checked; widget callbacks are called directly."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

import sigma_ref as sr
from sigma_ref import viz, widgets
from sigma_ref.lab import experiments, stats, var_study


def probe(mass_intra, mass_global, contamination):
    streams = ["intra", "intra", "global", "global"] if mass_intra is not None else ["global"] * 4
    heads = [mass_intra, mass_intra, mass_global, mass_global] if mass_intra is not None else [mass_global] * 4
    return {"cross_modal_mass": {"text_to_image": np.array([heads, heads]), "streams": streams},
            "contamination": {k: np.array(v) for k, v in contamination.items()}}


def test_latte_summary_data_means_and_stds_over_seeds():
    nan = [np.nan, np.nan]
    data = viz.latte_summary_data({
        "sigma": [probe(0.0, 0.4, {"intra": [0, 0.2], "global": [1, 1], "residual": [0.5, 0.7]}),
                  probe(0.0, 0.6, {"intra": [0, 0.4], "global": [1, 1], "residual": [0.5, 0.9]})],
        "standard": [probe(None, 0.5, {"intra": nan, "global": [1, 2], "residual": [1, 1]})]})
    assert data["sigma"]["mass"]["intra"] == (0.0, 0.0)
    assert data["sigma"]["mass"]["global"] == pytest.approx((0.5, 0.02 ** 0.5))        # the SAMPLE std of 0.4, 0.6
    np.testing.assert_allclose(data["sigma"]["contamination"]["intra"][0], [0, 0.3])
    assert "intra" not in data["standard"]["mass"] and "intra" not in data["standard"]["contamination"]
    fig = viz.latte_summary_figure({"sigma": [probe(0.0, 0.4, {"intra": [0, 0.2], "global": [1, 1], "residual": [0.5, 0.7]})]})
    assert len(fig.axes) == 2


def test_error_bars_stop_at_the_bounds_of_a_share():
    np.testing.assert_allclose(viz._bounded([0.95, 0.5, 0.02], [0.1, 0.1, 0.1], (0, 1)),
                               [[0.1, 0.1, 0.02], [0.05, 0.1, 0.1]])
    np.testing.assert_allclose(viz._bounded([2.0], [0.5], None), [[0.5], [0.5]])


def test_dilution_curves_draw_the_seed_mean_inside_its_bootstrap_band():
    per_seed = [[1.0, 0.8, 0.1], [1.0, 0.6, 0.3], [1.0, 0.7, 0.2]]
    curves = {(mix, kind): {"sigma": per_seed} for mix in ("text only", "irrelevant images") for kind in ("blank", "noise")}
    fig = viz.dilution_curves_figure(curves, (0, 16, 64), 16, stats.bootstrap_interval)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.0, 0.7, 0.2])
    outline = ax.collections[0].get_paths()[0].vertices                  # the band: lows, then highs
    at_16 = sorted(y for x, y in outline if x == 16)
    assert at_16[0] == pytest.approx(stats.bootstrap_interval([0.8, 0.6, 0.7])[0])
    assert at_16[-1] == pytest.approx(stats.bootstrap_interval([0.8, 0.6, 0.7])[1])
    assert at_16[0] < 0.7 < at_16[-1]
    assert "3 seeds" in fig._suptitle.get_text()


def test_differences_figure_draws_each_interval_and_fills_only_what_holm_keeps():
    compared = stats.with_holm([{"metric": "caption_exact_match", "a": "sigma", "b": "standard",
                                 **stats.paired_comparison([0.9] * 10, [0.8] * 10)},
                                {"metric": "caption_exact_match", "a": "moda", "b": "standard",
                                 **stats.paired_comparison([0.8, 0.9] * 5, [0.85] * 10)}])
    fig = experiments.differences_figure(compared, {"caption_exact_match": "caption EM"}, "t")
    ax = fig.axes[0]
    intervals, dots = ax.lines[0::2][:2], ax.lines[1::2][:2]
    np.testing.assert_allclose(intervals[0].get_xdata(), compared[0]["ci95"])
    assert [d.get_markerfacecolor() != "white" for d in dots] == [True, False]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["caption EM: sigma - standard", "caption EM: moda - standard"]


def test_mask_figures_draw_the_masks_they_are_given():
    ids = sr.layout("T2 I3 T1")
    fig = viz.mask_figure(ids)
    shown = [ax.images[0].get_array() for ax in fig.axes]
    np.testing.assert_array_equal(shown[0], sr.causal_mask(6).numpy())
    np.testing.assert_array_equal(shown[1], sr.intra_mask(ids).numpy())
    heads = viz.head_masks_figure(ids, 4, 1)
    np.testing.assert_array_equal(heads.axes[0].images[0].get_array(), sr.intra_mask(ids).numpy())
    np.testing.assert_array_equal(heads.axes[1].images[0].get_array(), sr.causal_mask(6).numpy())


def test_other_figures_render():
    probs = torch.rand(4, 6, 6)
    viz.stream_attention_figure(probs, sr.layout("T2 I4"), 2).savefig(__import__("io").BytesIO())
    tg = {"tokens": ["a"] * 5, "intra": np.random.rand(2, 5), "global": np.random.rand(2, 5)}
    viz.token_gates_figure(tg).savefig(__import__("io").BytesIO())
    with pytest.raises(ValueError, match="no gates"):
        viz.token_gates_figure({"tokens": ["a"]})
    history = [{"step": s, "gates": [{"intra": {"text": 0.7, "image": 0.5}, "global": {"text": 0.3, "image": 0.5}}]}
               for s in (0, 10)]
    fig = viz.gates_over_training_figure(history)
    assert len(fig.axes[0].lines) == 4
    runs = {"sigma": [{"dilution": {"blank": {"0": 1.0, "16": 0.5, "64": 0.2}}}] * 2}
    fig = viz.dilution_figure(runs)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [1.0, 0.5, 0.2])
    phi = {name: {"image": torch.rand(50) * 3, "text": [1.0, 2.0, 3.0]} for name in ("a", "b")}
    fig = var_study.sink_phi_figure(phi, 2.5, 64, "phi")
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"] and len(fig.axes[0].patches) == 3   # 3 histograms


@pytest.mark.parametrize("split", range(0, 9))
def test_head_split_callback(split):
    fig, numbers = widgets.head_split_view(split)
    assert len(fig.axes) == 8
    if split > 0:
        assert numbers["intra_change"] == 0.0 and numbers["intra_mass"] == 0.0
    if split < 8:
        assert numbers["global_change"] > 0 and numbers["global_mass"] > 0


@pytest.mark.parametrize("spec", ["T4 I8 T4 I4", "T1", "I5", "T1 I1 T1 I1 T1"])
def test_layout_callback(spec):
    fig, numbers = widgets.layout_view(spec)
    ids = sr.layout(spec)
    counts = [int((ids == m).sum()) for m in (0, 1)]
    assert numbers["intra_pairs"] == sum(c * (c + 1) // 2 for c in counts)


def test_layout_callback_rejects_bad_layouts():
    with pytest.raises(ValueError, match="layout"):
        widgets.layout_view("T4 X2")


def test_bias_callback_moves_the_gates_the_right_way():
    shares, gates = [], []
    for global_text in (-4.0, -2.0, 0.0, 2.0, 4.0):
        fig, numbers = widgets.bias_view(1.0, 0.0, global_text, 0.0)
        shares.append(numbers["global_share_text"])
        gates.append(numbers["gate_global_text"])
    assert shares == sorted(shares) and gates == sorted(gates)
    _, a = widgets.bias_view(3.0, 0.0, 0.0, 0.0)
    _, b = widgets.bias_view(-3.0, 0.0, 0.0, 0.0)
    assert a["gate_intra_text"] > 0.9 > 0.1 > b["gate_intra_text"]
    assert a["gate_intra_image"] == b["gate_intra_image"]      # the image row is untouched


def test_panels_show_errors_inside_their_output():
    pytest.importorskip("ipywidgets")
    panel = widgets.layout_panel("T2 I2")
    box, output = panel.children
    box.value = "not a layout"
    assert any(o.get("output_type") == "error" and "layout" in o.get("evalue", "") for o in output.outputs)
    box.value = "T3 I3"
    assert not any(o.get("output_type") == "error" for o in output.outputs)
    split_panel = widgets.head_split_panel(num_heads=4)
    slider, out = split_panel.children
    slider.value = 1
    assert not any(o.get("output_type") == "error" for o in out.outputs)


@pytest.mark.parametrize("backend", ["Agg", "module://matplotlib_inline.backend_inline"])
def test_panels_show_their_figure_as_png_whatever_the_backend(backend):
    """With MPLBACKEND=Agg exported (headless servers, CI images), display(fig) showed only "<Figure ...>"."""
    pytest.importorskip("ipywidgets")
    import base64

    import matplotlib
    previous = matplotlib.get_backend()
    matplotlib.use(backend)
    try:
        slider, output = widgets.head_split_panel(num_heads=4).children
        slider.value = 3
        figures = [o for o in output.outputs if o.get("output_type") == "display_data"]
        assert len(figures) == 1
        assert base64.b64decode(figures[0]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert any(o.get("output_type") == "stream" and "intra" in o["text"] for o in output.outputs)
    finally:
        matplotlib.use(previous)


def test_benchmark_figure_draws_time_and_memory_ratios_of_the_committed_run():
    import json
    from pathlib import Path

    results = json.loads((Path(__file__).resolve().parents[1] / "results" / "bench_cpu.json").read_text())
    fig = sr.viz.benchmark_figure(results)
    time_ax, memory_ax = fig.axes
    assert time_ax.get_xlabel().startswith("sequence length") and memory_ax.get_ylabel().endswith("/ standard")
    packed = next(line for line in time_ax.get_lines() if line.get_label() == "SIGMA packed")
    assert list(packed.get_xdata()) == [512, 2048, 4096, 8192]
    assert {l.get_label() for l in memory_ax.get_lines()} >= {"SIGMA packed", "SigmaAttention module"}
    floors = {"causal SDPA on the packed shapes", "SigmaAttention module, packing free"}
    assert floors <= {l.get_label() for l in time_ax.get_lines()}     # each floor beside what it is the floor of
    fig.canvas.draw()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels(minor=True) + ax.get_yticklabels()]
    assert "1x" in labels and all(label.endswith("x") for label in labels if label), labels   # ratios, not 10^0
