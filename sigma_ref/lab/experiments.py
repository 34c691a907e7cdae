"""Experiments: train many models, reuse what is trained, compare over seeds, write tables and figures.

    python -m sigma_ref compare --preset cpu --seeds 3 --out runs/cpu

`ensure_trained` is what notebooks and `compare` share: a model trained once (metrics.json and its
checkpoint in runs/<preset>/<attention>_seed<k>/) is reused, a run interrupted mid-training continues from
its last checkpoint, and a run of another recipe is started afresh, never mixed. Every results file is written
atomically, so an interrupted write never leaves a truncated file behind.

What is missing trains in parallel: one worker process per CPU core, one thread each (runtime.py says why),
or one process on a GPU. One process at a time trains into a directory (a lock file in it): a second notebook
that asks for the same models while the first trains them waits, then reuses them, instead of training them
again beside it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
from filelock import FileLock, Timeout

from .. import probes, viz
from ..model import ATTENTIONS
from ..checks import check_int
from ..evaluate import load_model
from ..runtime import machine_description, write_atomic
from . import stats
from .runs import read_metrics, run_dir, run_in_workers, train_job
from ..train import checkpoint_config, get_preset

ATTENTION_KINDS = tuple(ATTENTIONS)          # every kind the package defines (model.ATTENTIONS)
# The attentions by what one of their runs costs on a CPU, most first: MODA's training step costs most, and
# SIGMA's runs take the most steps of the others (docs/PERFORMANCE.md, the training-step table).
COSTLIEST_FIRST = ("moda", "sigma", "gated", "standard")

TABLE_METRICS = [("caption_exact_match", "caption EM"), ("compositional_exact_match", "compositional EM"),
                 ("text_only_accuracy", "text-only acc"), ("dilution.blank.64", "text-only, 64 blank img"),
                 ("dilution.noise.64", "text-only, 64 noise img"), ("test_loss", "test loss"),
                 ("train_seconds", "train s"), ("parameters", "params")]
# The metrics whose differences between attentions a compare run tests (every pair, one Holm family).
COMPARED_METRICS = [("caption_exact_match", "caption EM"), ("compositional_exact_match", "compositional EM")]


def ensure_trained(preset: str, seeds, out_dir: str | Path, attentions=ATTENTION_KINDS, backend: str = "auto",
                   progress: bool = True, workers: int | None = None) -> dict[str, list[dict]]:
    """Metrics of every (attention, seed) in out_dir, training only what is missing.

    A finished run of this preset is reused. A run without metrics whose checkpoint has this recipe resumes
    from it; a checkpoint of another recipe is set aside (renamed checkpoint.pt.stale) and training restarts.
    What is missing trains in `workers` processes (default: default_workers), each with TRAINING_THREADS.
    """
    config = get_preset(preset).updated(backend=backend)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(Path(out_dir) / ".training.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"another process is training into {out_dir}; waiting for it to finish, then reusing its models")
        lock.acquire()
    try:
        return _ensure_trained(preset, config, seeds, out_dir, attentions, progress, workers)
    finally:
        lock.release()


def _ensure_trained(preset, config, seeds, out_dir, attentions, progress, workers) -> dict[str, list[dict]]:
    finished, jobs = {}, []
    for seed in seeds:
        for attention in attentions:
            wanted = config.updated(attention=attention).as_dict()
            path = run_dir(out_dir, attention, seed)
            metrics = read_metrics(path / "metrics.json")
            if metrics is not None and metrics.get("preset") == preset and metrics.get("config") == wanted:
                finished[attention, seed] = metrics
                continue
            checkpoint = path / "checkpoint.pt"
            resume = checkpoint.exists() and checkpoint_config(checkpoint) == wanted
            if checkpoint.exists() and not resume:
                checkpoint.replace(path / "checkpoint.pt.stale")
            jobs.append({"attention": attention, "preset": preset, "seed": seed, "out_dir": path,
                         "config": config, "resume": resume})
    # The longest jobs first (longest-processing-time scheduling): the workers then end on short jobs, and
    # neither waits long for the other's last one. Which order a job runs in changes none of its numbers.
    jobs.sort(key=lambda job: COSTLIEST_FIRST.index(job["attention"]))
    # One job in this process keeps its own progress bar (a notebook training one model shows its steps).
    show_steps = len(jobs) == 1 or workers == 1
    results = run_in_workers(train_job, [{**job, "progress": progress and show_steps} for job in jobs], workers,
                             f"training {len(jobs)} models", progress)
    finished.update({(job["attention"], job["seed"]): metrics for job, metrics in zip(jobs, results)})
    return {attention: [finished[attention, seed] for seed in seeds] for attention in attentions}


def metric(metrics: dict, dotted: str):
    for key in dotted.split("."):
        metrics = metrics[key]
    return metrics


def seed_values(results: list[dict], key: str) -> list[float]:
    """One attention's values of a (dotted) metric, in seed order, so two attentions pair seed by seed."""
    return [metric(r, key) for r in sorted(results, key=lambda r: r["seed"])]


def summaries(runs: dict[str, list[dict]]) -> dict:
    """{attention: {metric: stats.summarize(per-seed values)}} for every metric of the table."""
    return {attention: {key: stats.summarize(seed_values(results, key)) for key, _ in TABLE_METRICS}
            for attention, results in runs.items()}


def comparisons(runs: dict[str, list[dict]], metrics=COMPARED_METRICS) -> list[dict]:
    """Every pair of attentions on every compared metric, the later attention minus the earlier one, seed by
    seed; the p-values are Holm-corrected as one family (all the comparisons the table makes)."""
    compared = []
    for key, _ in metrics:
        for earlier, later in itertools.combinations(runs, 2):
            if [r["seed"] for r in sorted(runs[earlier], key=lambda r: r["seed"])] != \
                    [r["seed"] for r in sorted(runs[later], key=lambda r: r["seed"])]:
                raise ValueError(f"runs of {earlier!r} and {later!r} must share their seeds to be compared")
            compared.append({"metric": key, "a": later, "b": earlier,
                             **stats.paired_comparison(seed_values(runs[later], key), seed_values(runs[earlier], key))})
    return stats.with_holm(compared)


def comparison_table(compared: list[dict], labels: dict | None = None, family: int | None = None) -> str:
    """Markdown: one row per comparison: mean difference with its 95% bootstrap interval, the seeds on each
    side, the paired sign-flip p and the Holm-corrected p (over `family` comparisons: default, these rows)."""
    labels = labels or dict(TABLE_METRICS)
    lines = [f"| metric | difference | mean [95% interval] | seeds higher / lower | p (sign-flip) | "
             f"p (Holm, {family or len(compared)} comparisons) |", "|---|---|---|---|---|---|"]
    for c in compared:
        lines.append(f"| {labels.get(c['metric'], c['metric'])} | {c['a']} minus {c['b']} | {c['mean_difference']:+.3f} "
                     f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['a_higher']} / {c['b_higher']} of {c['n']} | "
                     f"{c['p']:.3f} | {c['p_holm']:.3f}{' *' if c['significant'] else ''} |")
    return "\n".join(lines)


def differences_figure(compared: list[dict], labels: dict, title: str) -> plt.Figure:
    """A table's differences drawn: one row per comparison (stats.paired_comparison + with_holm), the mean
    difference as a dot, its 95% bootstrap interval as a line, filled where Holm's correction keeps it
    significant at 5%; the Holm-corrected p is written beside each row."""
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(compared) + 1.4), constrained_layout=True)
    for i, c in enumerate(compared):
        colour = viz.MODEL_COLOURS.get(c["a"], "k")
        ax.plot(c["ci95"], [i, i], color=colour, linewidth=2)
        ax.plot(c["mean_difference"], i, "o", color=colour, markerfacecolor=colour if c["significant"] else "white")
        ax.annotate(f"p_Holm {c['p_holm']:.3f}", (1.01, i), xycoords=("axes fraction", "data"), va="center",
                    fontsize=7)
    ax.axvline(0, color="0.5", linewidth=0.8)
    ax.set_yticks(range(len(compared)), [f"{labels.get(c['metric'], c['metric'])}: {c['a']} - {c['b']}"
                                         for c in compared], fontsize=7)
    ax.invert_yaxis()
    n = compared[0]["n"] if compared else 0
    ax.set_xlabel(f"mean difference over {n} seeds (line: 95% bootstrap interval; filled: significant after Holm)")
    ax.set_title(title)
    return fig


def summary_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: one row per attention; each metric as mean ± sample std [95% bootstrap interval] over seeds."""
    header = "| attention | " + " | ".join(label for _, label in TABLE_METRICS) + " |"
    lines = [header, "|---" * (len(TABLE_METRICS) + 1) + "|"]
    for attention, results in runs.items():
        cells = []
        for key, _ in TABLE_METRICS:
            values = seed_values(results, key)
            cells.append(f"{values[0]:.0f}" if key == "parameters" else
                         stats.summary_text(values, 1 if key == "train_seconds" else 3))
        lines.append(f"| {attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(preset: str, seeds: int, out_dir: str | Path, attentions=ATTENTION_KINDS,
            backend: str = "auto", progress: bool = True, workers: int | None = None) -> dict:
    """Train every attention for seeds 0..seeds-1; write results.json, results.md and the figures."""
    check_int("seeds", seeds, low=1)
    out_dir = Path(out_dir)
    runs = ensure_trained(preset, list(range(seeds)), out_dir, attentions, backend, progress, workers)
    machine = machine_description()
    compared = comparisons(runs)
    table, differences = summary_table(runs), comparison_table(compared)
    write_atomic(out_dir / "results.json", json.dumps(
        {"preset": preset, "seeds": list(range(seeds)), "machine": machine, "summary": summaries(runs),
         "comparisons": compared, "correction": {"method": "holm", "family": len(compared), "alpha": 0.05},
         "runs": runs}, indent=1))
    write_atomic(out_dir / "results.md",
                 f"Preset `{preset}`, seeds {list(range(seeds))}; each cell: mean ± sample std [95% bootstrap "
                 f"interval of the mean] over seeds; machine: {machine}\n\n{table}\n\n"
                 f"Differences, seed by seed (paired sign-flip test; Holm's correction over the whole table; "
                 f"* significant at 5% after it):\n\n{differences}\n")
    print(table + "\n\n" + differences)
    write_compare_figures(runs, out_dir, compared)
    return runs


def probe_trained_model(model, batch) -> dict:
    """Every per-model probe the compare figures need, as plain numbers."""
    return {"cross_modal_mass": probes.cross_modal_mass(model, batch),
            "contamination": probes.contamination(model, batch),
            "sinks": probes.attention_sinks(model, batch)}


def compare_figures(runs: dict[str, list[dict]], out_dir: str | Path, compared: list[dict] | None = None) -> dict:
    """Which figures a compare run gets: {file name: Figure}, from its metrics and its probed models."""
    batch = probes.probe_batch()
    probed = {m: [probe_trained_model(load_model(run_dir(out_dir, m, r["seed"]) / "checkpoint.pt"), batch)
                  for r in results] for m, results in runs.items()}
    figures = {
        "latte_summary.png": viz.latte_summary_figure(probed),
        "sinks.png": viz.sinks_figure({m: [p["sinks"] for p in ps] for m, ps in probed.items()}),
        "dilution_blank.png": viz.dilution_figure(runs, "blank"),
        "dilution_noise.png": viz.dilution_figure(runs, "noise"),
        "differences.png": differences_figure(compared if compared is not None else comparisons(runs),
                                              dict(TABLE_METRICS), "Differences between attentions"),
    }
    for model in ("gated", "sigma"):
        if model in runs:
            figures[f"gates_over_training_{model}.png"] = viz.gates_over_training_figure(
                runs[model][0]["gate_history"], f"{model}, seed {runs[model][0]['seed']}")
    return figures


def write_compare_figures(runs: dict[str, list[dict]], out_dir: str | Path,
                          compared: list[dict] | None = None) -> list[Path]:
    """Probe every trained model of a compare run and write its PNG figures next to its results table."""
    paths = []
    for name, fig in compare_figures(runs, out_dir, compared).items():
        fig.savefig(Path(out_dir) / name, dpi=110)
        plt.close(fig)
        paths.append(Path(out_dir) / name)
    return paths


def load_results(out_dir: str | Path) -> dict[str, list[dict]]:
    """The runs of a finished compare from its results.json."""
    return json.loads((Path(out_dir) / "results.json").read_text())["runs"]
