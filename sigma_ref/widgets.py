"""ipywidgets panels for the notebooks: edit a layout, slide the head split, set the bias initialisation.

Each panel is a thin wire between widgets and a PLAIN callback, `*_view(...)`, which returns a matplotlib
figure and the numbers it shows. Tests call the callbacks directly with several values: a headless notebook
run never moves a slider, and an exception inside a widget callback does not fail the notebook run. The
panels catch such an exception and show it inside their Output widget as an error output, which the
notebook tests look for.
"""

from __future__ import annotations

import base64
import io
import traceback

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import viz
from .attention import AttentionConfig, SigmaAttention
from .masks import IMAGE, TEXT, causal_mask, intra_mask, layout, layout_string

DEMO_LAYOUT = "T4 I8 T4 I4"


# ---------------------------------------------------------------------------------------------------
# Plain callbacks
# ---------------------------------------------------------------------------------------------------


def layout_view(spec: str) -> tuple[plt.Figure, dict]:
    """The causal and intra masks of a layout string, and how many query-key pairs each allows."""
    ids = layout(spec)
    numbers = {"layout": layout_string(ids), "tokens": len(ids),
               "causal_pairs": int(causal_mask(len(ids)).sum()), "intra_pairs": int(intra_mask(ids).sum())}
    numbers["intra_share"] = numbers["intra_pairs"] / numbers["causal_pairs"]
    return viz.mask_figure(ids), numbers


def _demo_layer(num_heads: int, num_intra_heads: int, bias_init=None, seed: int = 0) -> SigmaAttention:
    torch.manual_seed(seed)
    config = AttentionConfig(hidden_size=8 * num_heads, num_heads=num_heads, num_intra_heads=num_intra_heads,
                             backend="math", **({"bias_init": bias_init} if bias_init is not None else {}))
    return SigmaAttention(config).eval()


@torch.no_grad()
def purity_numbers(spec: str, num_heads: int, num_intra_heads: int, seed: int = 0) -> dict:
    """Change the image tokens of a random input; how far do text tokens' stream outputs move?

    Returns the largest change of o_intra and of o_global over text tokens (intra: exactly 0.0 whenever the
    split has intra heads), and the attention mass text queries put on image keys in each stream.
    """
    ids = layout(spec)
    layer = _demo_layer(num_heads, num_intra_heads, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, len(ids), layer.config.hidden_size, generator=g)
    image = (ids == IMAGE)[None, :, None]
    x_changed = torch.where(image, torch.randn(x.shape, generator=g), x)
    _, a = layer(x, ids, return_details=True)
    _, b = layer(x_changed, ids, return_details=True)
    text = ids == TEXT
    sees_image = torch.cumsum((ids == IMAGE).long(), 0) > 0
    mass = (a.attn_probs[0][:, text & sees_image][..., ids == IMAGE].sum(-1).mean(-1))     # [H]

    def largest(d1, d2):
        return float((d1[0, text] - d2[0, text]).abs().max()) if d1.shape[-1] else float("nan")

    return {"intra_change": largest(a.o_intra, b.o_intra), "global_change": largest(a.o_global, b.o_global),
            "intra_mass": float(mass[:num_intra_heads].mean()) if num_intra_heads else float("nan"),
            "global_mass": float(mass[num_intra_heads:].mean()) if num_intra_heads < num_heads else float("nan")}


def head_split_view(num_intra_heads: int, spec: str = DEMO_LAYOUT, num_heads: int = 8) -> tuple[plt.Figure, dict]:
    """Per-head masks for a split, and the purity numbers of a random SIGMA layer with that split."""
    ids = layout(spec)
    return viz.head_masks_figure(ids, num_heads, num_intra_heads), purity_numbers(spec, num_heads, num_intra_heads)


@torch.no_grad()
def bias_view(intra_text: float, intra_image: float, global_text: float, global_image: float,
              spec: str = "T4 I8 T6", num_heads: int = 4, input_scale: float = 0.5) -> tuple[plt.Figure, dict]:
    """Gate values per token for a bias initialisation, and how the output splits between the streams.

    The layer is freshly initialised (as at the start of training), so the gates are sigmoid(bias) plus the
    small input-dependent part gate_proj(x). "global_share" is the fraction of the gated output's norm that
    comes from the global stream: how much cross-modal mixing the initialisation lets through.
    """
    ids = layout(spec)
    bias = ((intra_text, intra_image), (global_text, global_image))
    layer = _demo_layer(num_heads, num_heads // 2, bias_init=bias)
    x = input_scale * torch.randn(1, len(ids), layer.config.hidden_size, generator=torch.Generator().manual_seed(0))
    _, d = layer(x, ids, return_details=True)
    g_intra, g_global = d.g_intra[0].mean(-1), d.g_global[0].mean(-1)                      # [S]
    intra_part = (d.g_intra * d.o_intra)[0].norm(dim=-1)
    global_part = (d.g_global * d.o_global)[0].norm(dim=-1)
    share = global_part / (intra_part + global_part)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.6), sharex=True, constrained_layout=True)
    positions = np.arange(len(ids))
    top.bar(positions - 0.2, g_intra.numpy(), 0.4, color=viz.STREAM_COLOURS["intra"], label="intra gate")
    top.bar(positions + 0.2, g_global.numpy(), 0.4, color=viz.STREAM_COLOURS["global"], label="global gate")
    top.set_ylim(0, 1)
    top.set_ylabel("mean gate")
    top.legend(fontsize=8, loc="upper right")
    top.set_title(f"bias_init = {bias}")
    bottom.bar(positions, share.numpy(), color=viz.STREAM_COLOURS["global"])
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("global share of output")
    bottom.set_xticks(positions, ["T" if m == TEXT else "I" for m in ids.tolist()])
    text = ids == TEXT
    numbers = {"gate_intra_text": float(g_intra[text].mean()), "gate_intra_image": float(g_intra[~text].mean()),
               "gate_global_text": float(g_global[text].mean()), "gate_global_image": float(g_global[~text].mean()),
               "global_share_text": float(share[text].mean())}
    return fig, numbers


# ---------------------------------------------------------------------------------------------------
# Panels
# ---------------------------------------------------------------------------------------------------


def figure_png(fig: plt.Figure) -> str:
    """The figure as a base64 PNG, drawn by matplotlib itself: it does not depend on the backend (with
    MPLBACKEND=Agg exported, as headless servers often do, `display(fig)` shows only "<Figure ...>")."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _show(output, callback, *args, **kwargs):
    """Run callback into `output`: its figure and numbers on success, the traceback as an error output if not.

    The outputs are set directly (nbformat dicts) rather than printed inside `with output:`, so what the
    learner sees is the same under any matplotlib backend, and tests can read it without a kernel.
    """
    try:
        fig, numbers = callback(*args, **kwargs)
    except Exception as error:                               # shown to the learner, and found by the tests
        output.outputs = ({"output_type": "error", "ename": type(error).__name__, "evalue": str(error),
                           "traceback": traceback.format_exception(error)},)
        return None
    text = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in numbers.items())
    output.outputs = ({"output_type": "display_data", "metadata": {},
                       "data": {"image/png": figure_png(fig), "text/plain": f"<figure: {callback.__name__}>"}},
                      {"output_type": "stream", "name": "stdout", "text": text + "\n"})
    plt.close(fig)
    return numbers


def layout_panel(spec: str = DEMO_LAYOUT):
    """A text box for a layout string and both masks below it."""
    import ipywidgets as w

    box = w.Text(value=spec, description="layout", continuous_update=False)
    output = w.Output()
    box.observe(lambda change: _show(output, layout_view, change["new"]), names="value")
    _show(output, layout_view, spec)
    return w.VBox([box, output])


def head_split_panel(spec: str = DEMO_LAYOUT, num_heads: int = 8, value: int | None = None):
    """A slider for the number of intra heads, the per-head masks and the purity numbers."""
    import ipywidgets as w

    slider = w.IntSlider(value=num_heads // 2 if value is None else value, min=0, max=num_heads,
                         description="intra heads", continuous_update=False)
    output = w.Output()
    slider.observe(lambda change: _show(output, head_split_view, change["new"], spec, num_heads), names="value")
    _show(output, head_split_view, slider.value, spec, num_heads)
    return w.VBox([slider, output])


def bias_panel(spec: str = "T4 I8 T6", bias_init=((1.0, 0.0), (-1.0, 0.0))):
    """Four sliders, B[stream][modality], and the gates per token they produce."""
    import ipywidgets as w

    names = ["intra_text", "intra_image", "global_text", "global_image"]
    values = [bias_init[0][0], bias_init[0][1], bias_init[1][0], bias_init[1][1]]
    sliders = [w.FloatSlider(value=v, min=-4, max=4, step=0.5, description=n.replace("_", " "),
                             continuous_update=False) for n, v in zip(names, values)]
    output = w.Output()

    def update(_=None):
        _show(output, bias_view, *[s.value for s in sliders], spec=spec)

    for s in sliders:
        s.observe(update, names="value")
    update()
    return w.VBox([w.HBox(sliders[:2]), w.HBox(sliders[2:]), output])
