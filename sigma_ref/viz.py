"""Matplotlib figures for the course. Every function returns a Figure and draws nothing it was not given.

Mask plots follow the convention learners know from attention tutorials: query rows, key columns, dark =
may attend, T/I tick labels, a grid on short sequences. The figure functions take plain arrays (from
masks.py or probes.py), so their data can be tested without looking at pixels.

Run `python -m sigma_ref.viz OUT.png` to draw the per-head masks of a small layout.
"""

from __future__ import annotations

import sys

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from . import masks as M

MODEL_COLOURS = {"standard": "#7f7f7f", "gated": "#1f77b4", "sigma": "#d62728", "moda": "#ff7f0e"}
STREAM_COLOURS = {"intra": "#2ca02c", "global": "#9467bd"}


def _labels(modality_ids) -> list[str]:
    return ["T" if int(m) == M.TEXT else "I" for m in modality_ids]


def plot_mask(mask, modality_ids, ax=None, title: str = "") -> plt.Axes:
    """One [S, S] boolean mask: query rows, key columns, dark where attention is allowed."""
    mask = torch.as_tensor(mask).detach().bool().cpu().numpy()
    ax = ax or plt.figure(figsize=(4, 4)).add_subplot()
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
    n = mask.shape[0]
    if n <= 40:
        labels = _labels(modality_ids)
        ax.set_xticks(range(n), labels, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xticks(np.arange(-0.5, n), minor=True)
        ax.set_yticks(np.arange(-0.5, n), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    return ax


def mask_figure(modality_ids) -> plt.Figure:
    """The causal mask and the intra mask of one layout, side by side."""
    ids = torch.as_tensor(modality_ids)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), constrained_layout=True)
    plot_mask(M.causal_mask(len(ids)), ids, axes[0], "causal (global stream)")
    plot_mask(M.intra_mask(ids), ids, axes[1], "intra (same modality and causal)")
    fig.suptitle(M.layout_string(ids))
    return fig


def head_masks_figure(modality_ids, num_heads: int, num_intra_heads: int) -> plt.Figure:
    """One small mask per head for a given split: intra heads first, then global."""
    ids = torch.as_tensor(modality_ids)
    masks = M.sigma_mask(ids, num_heads, num_intra_heads)                       # [H, S, S]
    fig, axes = plt.subplots(1, num_heads, figsize=(1.9 * num_heads, 2.7), constrained_layout=True)
    for h, ax in enumerate(np.atleast_1d(axes)):
        stream = "intra" if h < num_intra_heads else "global"
        plot_mask(masks[h], ids, ax, f"head {h}: {stream}")
        ax.title.set_color(STREAM_COLOURS[stream])
        ax.tick_params(labelsize=5)
        if h:                                   # one set of axis labels is enough for a row of small masks
            ax.set_ylabel("")
    fig.suptitle(f"{num_intra_heads} intra + {num_heads - num_intra_heads} global heads "
                 f"(rows: queries, columns: keys; dark: may attend)")
    return fig


def stream_attention_figure(attn_probs, modality_ids, num_intra_heads: int, title: str = "") -> plt.Figure:
    """Mean attention map of each stream for one sequence ([H, S, S] probabilities)."""
    probs = torch.as_tensor(attn_probs).detach().float()
    streams = [("intra", probs[:num_intra_heads]), ("global", probs[num_intra_heads:])]
    streams = [(name, p) for name, p in streams if len(p)]
    fig, axes = plt.subplots(1, len(streams), figsize=(4.8 * len(streams), 4), constrained_layout=True, squeeze=False)
    allowed = {"intra": M.intra_mask(torch.as_tensor(modality_ids)).numpy(),
               "global": M.causal_mask(len(modality_ids)).numpy()}
    for ax, (name, p) in zip(axes[0], streams):
        # Masked cells are drawn grey, apart from allowed cells that got (almost) no attention, which are dark.
        # The colour scale is a square root (PowerNorm 0.5), so small masses stay visible; the bar shows values.
        shown = np.ma.masked_where(~allowed[name], p.mean(0).numpy())
        cmap = plt.get_cmap("magma").with_extremes(bad="0.85")
        image = ax.imshow(shown, cmap=cmap, norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1),
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.8, label="attention probability (grey: masked)")
        labels = _labels(modality_ids)
        step = max(1, len(labels) // 24)
        ax.set_xticks(range(0, len(labels), step), labels[::step], fontsize=6)
        ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=6)
        ax.set_title(f"{name} stream (mean over {len(p)} heads)")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(title)
    return fig


def token_gates_figure(token_gates: dict, title: str = "") -> plt.Figure:
    """Heatmap of per-token mean gates (probes.token_gates): one row per layer and stream."""
    rows, labels = [], []
    for stream in ("intra", "global"):
        if stream in token_gates:
            for layer, values in enumerate(token_gates[stream]):
                rows.append(values)
                labels.append(f"L{layer} {stream}")
    if not rows:
        raise ValueError("token_gates_figure: the model has no gates (standard attention)")
    words = token_gates["tokens"]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(words)), 0.45 * len(rows) + 1.6), constrained_layout=True)
    image = ax.imshow(np.stack(rows), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(words)), words, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.colorbar(image, ax=ax, label="mean gate")
    ax.set_title(title or "gate value per token")
    return fig


def gates_over_training_figure(gate_history: list[dict], title: str = "") -> plt.Figure:
    """Mean gate per stream x modality (averaged over layers) against the training step."""
    steps = [h["step"] for h in gate_history]
    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    for stream in ("intra", "global"):
        for modality, style in (("text", "-"), ("image", "--")):
            values = [np.mean([layer[stream][modality] for layer in h["gates"] if stream in layer])
                      if any(stream in layer for layer in h["gates"]) else np.nan for h in gate_history]
            if not np.all(np.isnan(values)):
                ax.plot(steps, values, style, color=STREAM_COLOURS[stream], label=f"{stream} gate, {modality} tokens")
    ax.set(xlabel="training step", ylabel="mean gate", ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    return fig


def _mean_std(values):
    """Mean and SAMPLE standard deviation (ddof=1, as the tables use) over the first axis (the seeds)."""
    arr = np.array(values, dtype=float)
    return np.nanmean(arr, axis=0), (np.nanstd(arr, axis=0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1:]))


def _bounded(mean, std, bounds):
    """matplotlib's yerr [2, n]: ± std, cut at the quantity's (low, high) bounds (a share cannot pass 1.0)."""
    mean, std, (low, high) = np.atleast_1d(mean), np.atleast_1d(std), bounds or (-np.inf, np.inf)
    return np.stack([np.minimum(std, mean - low), np.minimum(std, high - mean)]).clip(min=0)


def latte_summary_data(probes_by_model: dict[str, list[dict]]) -> dict:
    """The numbers the summary figure draws, from {model: [per-seed probe dicts]}.

    Each probe dict holds "cross_modal_mass" and "contamination" (probes.py). Returns, per model, the mean
    and std over seeds of the text->image mass per stream and of the contamination per layer.
    """
    summary = {}
    for model, seeds in probes_by_model.items():
        entry = {"mass": {}, "contamination": {}}
        for stream in ("intra", "global"):
            per_seed = []
            for p in seeds:
                heads = [h for h, s in enumerate(p["cross_modal_mass"]["streams"]) if s == stream]
                if heads:
                    per_seed.append([np.nanmean(np.asarray(p["cross_modal_mass"]["text_to_image"])[:, heads])])
            if per_seed:
                mean, std = _mean_std(per_seed)
                entry["mass"][stream] = (float(mean[0]), float(std[0]))
        for kind in ("intra", "global", "residual"):
            curves = [np.asarray(p["contamination"][kind], dtype=float) for p in seeds]
            if not np.all(np.isnan(curves)):
                entry["contamination"][kind] = _mean_std(curves)
        summary[model] = entry
    return summary


def latte_summary_figure(probes_by_model: dict[str, list[dict]]) -> plt.Figure:
    """The one-glance figure: cross-modal mass per stream (left) and contamination per layer (right)."""
    data = latte_summary_data(probes_by_model)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    bars, labels, colours, errs = [], [], [], []
    for model, entry in data.items():
        for stream, (mean, std) in entry["mass"].items():
            bars.append(mean)
            errs.append(std)
            labels.append(f"{model}\n{stream}")
            colours.append(MODEL_COLOURS.get(model, "k"))
    left.bar(range(len(bars)), bars, yerr=_bounded(bars, errs, (0, 1)), color=colours, capsize=3)
    left.set_xticks(range(len(bars)), labels, fontsize=8)
    left.set_ylabel("text queries' attention on image keys")
    left.set_title("what mixes: cross-modal attention per stream")
    for i, (b, e) in enumerate(zip(bars, errs)):                   # above the error bar, not on it
        left.annotate(f"{b:.2f}", (i, b + e), xytext=(0, 3), textcoords="offset points", ha="center",
                      va="bottom", fontsize=8)
    left.set_ylim(0, max(b + e for b, e in zip(bars, errs)) * 1.2 + 0.02)
    styles = {"intra": ":", "global": "--", "residual": "-"}
    for model, entry in data.items():
        for kind, (mean, std) in entry["contamination"].items():
            layers = np.arange(len(mean))
            right.errorbar(layers, mean, yerr=std, linestyle=styles[kind], marker="o", capsize=3,
                           color=MODEL_COLOURS.get(model, "k"), label=f"{model} {kind}")
    right.set_xlabel("layer")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_ylabel("relative change of text tokens when the\nimage changes, |h' - h| / |h| (> 1: moved\nby more than its own length)")
    right.set_title("what stays pure: contamination of text tokens")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("The latte, measured (mean ± sample std over seeds)")
    return fig


def seeds_errorbar_figure(values_by_model: dict[str, list], x, xlabel: str, ylabel: str, title: str,
                          dodge: float = 0.0, bounds=None) -> plt.Figure:
    """Lines with error bars over seeds: values_by_model[model] is a list (seeds) of arrays over x.

    dodge shifts each model's points sideways by that much (in x units), so lines that coincide (three models
    all at 0.0) stay visible side by side; each model also gets its own marker. Bars are ± the sample std over
    seeds, cut at `bounds` (low, high) when the quantity has them.
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.8), constrained_layout=True)
    markers = "osD^v"
    for i, (model, per_seed) in enumerate(values_by_model.items()):
        mean, std = _mean_std(per_seed)
        shift = dodge * (i - (len(values_by_model) - 1) / 2)
        ax.errorbar(np.asarray(x, dtype=float) + shift, mean, yerr=_bounded(mean, std, bounds), capsize=3,
                    marker=markers[i % len(markers)], alpha=0.85, color=MODEL_COLOURS.get(model, "k"), label=model)
    ax.set_xlabel(xlabel)
    ax.set_xticks(list(x))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return fig


def sinks_figure(sinks_by_model: dict[str, list[dict]]) -> plt.Figure:
    """First-token attention fraction per layer, mean ± sample std over seeds; dotted, in each model's colour,
    what uniform attention over the allowed keys gives (probes.attention_sinks): a model without a sink sits near it."""
    values = {m: [s["first_token"] for s in seeds] for m, seeds in sinks_by_model.items()}
    layers = np.arange(len(next(iter(values.values()))[0]))
    fig = seeds_errorbar_figure(values, layers, "layer", "attention on the first token\n(pairs that may attend to it)",
                                "Attention sinks (mean ± sample std over seeds)", dodge=0.05, bounds=(0, 1))
    for model, seeds in sinks_by_model.items():
        fig.axes[0].plot(layers, np.mean([s["uniform_baseline"] for s in seeds], axis=0), ":",
                         color=MODEL_COLOURS.get(model, "k"), label=f"{model}: uniform attention")
    fig.axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))          # beside: hides no data
    return fig


def dilution_figure(runs: dict[str, list[dict]], kind: str = "blank") -> plt.Figure:
    """Text-only accuracy against inserted image tokens, from compare's metrics (mean ± sample std over seeds)."""
    counts = sorted(int(n) for n in next(iter(runs.values()))[0]["dilution"][kind])
    values = {m: [[r["dilution"][kind][str(n)] for n in counts] for r in results] for m, results in runs.items()}
    return seeds_errorbar_figure(values, counts, f"{kind} image tokens inserted", "text-only exact match",
                                 f"Dilution: text-only task with {kind} image tokens", dodge=0.02 * max(counts),
                                 bounds=(0, 1))


def dilution_curves_figure(curves: dict, counts, max_train: int, interval,
                           band_label: str = "95% bootstrap interval of the mean") -> plt.Figure:
    """curves[(mix, kind)][model] = per-seed lists of accuracy over `counts`; one panel per (mix, kind).

    Each model's line is the mean over seeds and its band `interval(values at one count)` -> (low, high), which
    the lab passes as the 95% bootstrap interval of the mean (lab/stats.py); the x axis is symlog (0 is a count
    too); the grey span marks what the irrelevant-images mix trained on.
    """
    mixes = sorted({mix for mix, _ in curves}, reverse=True)
    kinds = sorted({kind for _, kind in curves})
    fig, axes = plt.subplots(len(mixes), len(kinds), figsize=(5 * len(kinds), 3.4 * len(mixes)),
                             constrained_layout=True, squeeze=False, sharey=True)
    seeds = 0
    for row, mix in enumerate(mixes):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            if mix != "text only":
                ax.axvspan(0, max_train, color="0.92", zorder=0, label=f"trained with 0..{max_train}")
            for model, per_seed in curves[(mix, kind)].items():
                seeds = max(seeds, len(per_seed))
                colour = MODEL_COLOURS.get(model, "k")
                mean = np.mean(per_seed, axis=0)
                low, high = zip(*(interval(column) for column in zip(*per_seed)))
                ax.fill_between(counts, low, high, color=colour, alpha=0.18, linewidth=0)
                ax.plot(counts, mean, marker="o", markersize=4, color=colour, label=model)
            ax.set_xscale("symlog", linthresh=max(1, counts[1]))
            ax.set_xticks(list(counts), [str(c) for c in counts])
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel(f"{kind} image tokens inserted")
            ax.set_ylabel("text-only exact match")
            ax.set_title(f"trained on: {mix}")
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Dilution: text-only accuracy with irrelevant image tokens (mean over {seeds} seeds; band: "
                 f"{band_label})")
    return fig


def ablation_figure(values: dict[str, list[float]], label: str, title: str) -> plt.Figure:
    """Horizontal bars, one per variant: the mean over seeds, ± the sample std (cut at 0 and 1), with the
    per-seed values as dots."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2), constrained_layout=True)
    means = [np.mean(values[n]) for n in names]
    stds = [np.std(values[n], ddof=1) if len(values[n]) > 1 else 0.0 for n in names]
    ax.barh(range(len(names)), means, xerr=_bounded(means, stds, (0, 1)), color=[MODEL_COLOURS["sigma"] if n == "sigma" else "0.6"
                                                          for n in names], capsize=3, alpha=0.7)
    for i, n in enumerate(names):
        ax.plot(values[n], [i] * len(values[n]), "k.", markersize=5)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(label)
    ax.set_title(title)
    return fig


def text_gates_figure(histories: dict[str, list[dict]], title: str) -> plt.Figure:
    """The global gate on TEXT tokens over training (mean over layers and seeds), per model and probe batch."""
    styles = {"gates": ("describe samples", "-"), "gates_expand": ("expand, no images", "--"),
              "gates_expand_images": ("expand + 16 blank images", ":")}
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    for model, per_seed in histories.items():
        for key, (name, style) in styles.items():
            curves = [[np.mean([layer["global"]["text"] for layer in h[key] if "global" in layer]) for h in history]
                      for history in per_seed]
            steps = [h["step"] for h in per_seed[0]]
            length = min(len(c) for c in curves)
            ax.plot(steps[:length], np.mean([c[:length] for c in curves], axis=0), style,
                    color=MODEL_COLOURS.get(model, "k"), label=f"{model}: {name}")
    ax.set(xlabel="training step", ylabel="global gate on text tokens", title=title)
    ax.legend(fontsize=7, ncol=2)
    return fig


# The benchmark's rows drawn, by their stable keys (lab/bench.py's ROWS), and their colours.
BENCH_SERIES = {"sigma_packed": "tab:blue", "packed_shapes": "tab:cyan", "sigma_sdpa": "tab:red",
                "sigma_module": "tab:green", "sigma_module_packing_free": "tab:olive"}


def _ratio_label(ax):
    """A log axis's tick label as a ratio ("0.8x"); on an axis spanning more than a factor 5, only the ticks
    at 1, 2 and 5 times a power of ten, so the labels do not run into each other."""
    def label(value, _):
        low, high = ax.get_ylim()
        leading = round(value / 10 ** np.floor(np.log10(value)), 6)
        return f"{value:g}x" if high / low <= 5 or leading in (1, 2, 5) else ""
    return label


def benchmark_figure(results: dict, title: str = "") -> plt.Figure:
    """The results of `python -m sigma_ref bench --out FILE.json`: forward+backward time (left) and peak memory
    growth (right) of SIGMA's attention as a ratio to its standard reference, against the sequence length."""
    tables = {t["title"].split(",")[0]: t for t in results["tables"]}
    timing = next(t for name, t in tables.items() if name.startswith("Attention time"))
    memory = [t for name, t in tables.items() if name.startswith("Peak memory")]
    labels = {key: row[1] for key, row in zip(timing["keys"], timing["rows"])}
    by_key = lambda table: {(row[0], key): row[-1] for key, row in zip(table["keys"], table["rows"])}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    panels = [(axes[0], by_key(timing), "forward+backward time")]
    if memory:
        panels.append((axes[1], by_key(memory[0]), "peak memory growth"))
    else:
        axes[1].set_axis_off()
    for ax, ratios, quantity in panels:
        for key, colour in BENCH_SERIES.items():
            points = sorted((n, r) for (n, k), r in ratios.items() if k == key and r is not None)
            if points:
                ax.plot(*zip(*points), "o-", color=colour, label=labels[key])
        ax.axhline(1.0, color="black", lw=1, label="standard attention (1x)")
        if quantity.endswith("time"):
            ax.axhline(0.75, color="grey", lw=1, ls="--", label="floor: half the heads do half the work")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_ratio_label(ax)))  # 0.8x, not 8x10^-1
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_ratio_label(ax)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel("sequence length N (half the tokens image)")
        ax.set_ylabel(f"{quantity} / standard")
        ax.set_title(quantity)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)   # below: hides no line
    fig.suptitle(title or f"SIGMA vs standard attention ({results.get('machine', '')})", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    head_masks_figure(M.layout("T3 I6 T4"), 8, 4).savefig(sys.argv[1] if len(sys.argv) > 1 else "head_masks.png")
