"""The documents' figures, generated from the committed runs: README.md, docs/RESULTS.md, docs/PERFORMANCE.md.

Every number a document quotes from a run sits between markers

    <!-- name -->
    ...generated text...
    <!-- /name -->

and `BLOCKS[name](results_dir)` generates that text from the files in results/. `python -m sigma_ref report`
rewrites every block after a run is regenerated; `python -m sigma_ref report --check` (and
tests/test_project.py) fails when a block differs from what the committed runs give. Prose outside the blocks
reads the figures but does not repeat them, so rewording it never breaks a test, and a new run cannot leave a
stale number behind.
"""

from __future__ import annotations

import ast
import json
import math
import re
import statistics
from pathlib import Path

from ..teaching import launch
from . import stats
from .bench import Table
from .dilution import ABLATIONS, MODA_ABLATIONS, load_metrics
from .experiments import ATTENTION_KINDS

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", "docs/RESULTS.md", "docs/PERFORMANCE.md")
BLOCK = re.compile(r"<!-- ([a-z0-9-]+) -->\n(.*?)<!-- /\1 -->", re.S)


def _json(results: Path, name: str) -> dict:
    return json.loads((results / name).read_text())


def _tables(results: Path, name: str) -> str:
    return "\n\n".join(Table(t["title"], t["columns"], t["rows"]).markdown() for t in _json(results, name)["tables"])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# -- compare: results/cpu --------------------------------------------------------------------------------


def _markdown_tables(path: Path) -> list[str]:
    """The tables of a results.md, each as its lines."""
    return [p.strip() for p in path.read_text().split("\n\n") if p.strip().startswith("|")]


def compare_table(results: Path) -> str:
    """The compare run's summary table (mean ± std [interval] per attention and metric)."""
    return _markdown_tables(results / "cpu" / "results.md")[0]


def compare_differences(results: Path) -> str:
    """The compare run's table of paired differences (every pair of attentions, Holm-corrected)."""
    return _markdown_tables(results / "cpu" / "results.md")[1]


def differences_text(compared: list[dict], labels: dict | None = None) -> str:
    """The comparisons of a family in words: which differences survive Holm's correction, and how many do not."""
    labels = labels or {}
    kept = [c for c in compared if c["significant"]]
    said = "; ".join(f"{labels.get(c['metric'], c['metric'])}: {c['a']} minus {c['b']} {100 * c['mean_difference']:+.1f} "
                     f"points [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}], higher on {c['a_higher']} of "
                     f"{c['n']} seeds, p {c['p']:.3f}, Holm {c['p_holm']:.3f}" for c in kept)
    return (f"{len(kept)} of {len(compared)} paired differences significant at 5% after Holm's correction"
            + (f": {said}" if kept else "") + ".")


def compare_figures(results: Path) -> str:
    data = _json(results, "cpu/results.json")
    runs, summary = data["runs"], data["summary"]
    kinds = [a for a in ATTENTION_KINDS if a in runs]
    mean = lambda a, key: summary[a][key]["mean"]
    interval = lambda a, key: f"[{_pct(summary[a][key]['ci95'][0])}, {_pct(summary[a][key]['ci95'][1])}]"
    every = lambda key: [r[key] for a in kinds for r in runs[a]]
    caption, steps = every("caption_exact_match"), every("steps")
    per_step = [1e3 * r["train_seconds"] / r["steps"] for a in kinds for r in runs[a]]
    labels = {"caption_exact_match": "caption EM", "compositional_exact_match": "compositional EM"}
    lines = [
        f"- Caption exact match, mean [95% interval] over {len(runs[kinds[0]])} seeds: "
        + ", ".join(f"{a} {_pct(mean(a, 'caption_exact_match'))} {interval(a, 'caption_exact_match')}" for a in kinds)
        + f"; every run {_pct(min(caption))}-{_pct(max(caption))}.",
        "- Compositional exact match, mean [95% interval] (seed range): "
        + ", ".join(f"{a} {_pct(mean(a, 'compositional_exact_match'))} {interval(a, 'compositional_exact_match')} "
                    f"({_pct(min(r['compositional_exact_match'] for r in runs[a]))}-"
                    f"{_pct(max(r['compositional_exact_match'] for r in runs[a]))})" for a in kinds) + ".",
        f"- Between attentions (every pair, both metrics): {differences_text(data['comparisons'], labels)}",
        f"- Text-only accuracy: lowest run {_pct(min(every('text_only_accuracy')))}; with 64 inserted image tokens, "
        f"highest run: blank {_pct(max(r['dilution']['blank']['64'] for a in kinds for r in runs[a]))}, "
        f"noise {_pct(max(r['dilution']['noise']['64'] for a in kinds for r in runs[a]))}.",
        f"- Training: stopped after {min(steps)}-{max(steps)} steps, {min(every('train_seconds')):.0f}-"
        f"{max(every('train_seconds')):.0f} s per model ({min(per_step):.0f}-{max(per_step):.0f} ms a step, one "
        f"thread, two models at a time); {sum(r['target_reached'] is not None for a in kinds for r in runs[a])} of "
        f"{len(caption)} runs stopped by the stopping rule (the others at the 600-step budget).",
    ]
    return "\n".join(lines)


def seed_spread(results: Path) -> str:
    """How to read a seed spread, with the compare run's own numbers."""
    data = _json(results, "cpu/results.json")
    runs, summary, compared = data["runs"], data["summary"], data["comparisons"]
    kinds = [a for a in ATTENTION_KINDS if a in runs]
    n = len(runs[kinds[0]])
    key = "compositional_exact_match"
    widest = max(kinds, key=lambda a: max(r[key] for r in runs[a]) - min(r[key] for r in runs[a]))
    values = [r[key] for r in runs[widest]]
    width = summary[widest][key]["ci95"][1] - summary[widest][key]["ci95"][0]
    caption = [c for c in compared if c["metric"] == "caption_exact_match"]
    smallest = min(caption, key=lambda c: c["p"])
    return "\n".join([
        f"- One attention, one recipe, {n} seeds: {widest}'s compositional exact match runs from "
        f"{_pct(min(values))} to {_pct(max(values))} (sample standard deviation {100 * summary[widest][key]['std']:.1f} "
        f"points). The 95% interval of its mean is {100 * width:.1f} points wide: it shrinks with the square root "
        f"of the seeds, so three seeds would give an interval about {math.sqrt(n / 3):.1f}x as wide.",
        f"- A paired sign-flip test over {n} seeds cannot give p below 2 / 2^{n} = {2 / 2 ** n:.4f}; over three "
        "seeds, 0.25, which is why a three-seed run can only report a lead.",
        f"- The compare run makes {len(compared)} comparisons at once (every pair of attentions, caption and "
        f"compositional exact match); at 5% each, about {0.05 * len(compared):.1f} would look significant by luck if "
        f"no attention differed. Holm's correction multiplies the smallest p by {len(compared)}, the next by "
        f"{len(compared) - 1}, and so on. The smallest caption p here: {smallest['a']} minus {smallest['b']}, "
        f"p {smallest['p']:.4f}, after Holm {smallest['p_holm']:.4f}.",
    ])


# -- dilution: results/dilution ----------------------------------------------------------------------------


def dilution_tables(results: Path) -> str:
    paragraphs = (results / "dilution" / "results.md").read_text().split("\n\n")
    return "\n\n".join(p.strip() for p in paragraphs if p.strip().startswith("|"))


def dilution_figures(results: Path) -> str:
    data = _json(results, "dilution/results.json")
    metrics, _ = load_metrics(results / "dilution")
    by = lambda mix, variant: sorted((m for m in metrics if m["train_mix"] == mix and m["variant"] == variant),
                                     key=lambda m: m["seed"])
    acc = lambda mix, variant, kind, n: [m["accuracy"][kind][str(n)] for m in by(mix, variant)]
    mean = lambda *args: statistics.fmean(acc(*args))
    lines = [f"- {len(by('text only', 'sigma'))} seeds per model. Trained on text only, with 16 blank image tokens "
             "inserted: " + ", ".join(f"{a} {mean('text only', a, 'blank', 16):.2f}" for a in ATTENTION_KINDS)
             + f"; with 64 blank tokens the best run keeps "
             f"{max(max(acc('text only', a, 'blank', 64)) for a in ATTENTION_KINDS):.3f}."]
    mixed = "irrelevant images"
    for kind, n in (("noise", 64), ("noise", 128), ("blank", 64), ("blank", 128)):
        lines.append(f"- Trained with irrelevant images, {n} {kind} tokens, mean [95% interval]: " + ", ".join(
            f"{a} {mean(mixed, a, kind, n):.2f} [{stats.bootstrap_interval(acc(mixed, a, kind, n))[0]:.2f}, "
            f"{stats.bootstrap_interval(acc(mixed, a, kind, n))[1]:.2f}]" for a in ATTENTION_KINDS) + ".")
    lines.append(f"- SIGMA against each baseline at 64 and 128 tokens: {differences_text(data['comparisons'])}")
    for name, grid in (("SIGMA", ABLATIONS), ("MODA", MODA_ABLATIONS)):
        variants = [v for v in grid if by(mixed, v)]
        if len(variants) > 1:
            lines.append(f"- {name}'s ablations (irrelevant images; caption EM / 64 blank / 128 noise): "
                         + ", ".join(f"{v} {statistics.fmean(m['caption_exact_match'] for m in by(mixed, v)):.3f} / "
                                     f"{mean(mixed, v, 'blank', 64):.2f} / {mean(mixed, v, 'noise', 128):.2f}"
                                     for v in variants)
                         + f"; each part against {name}: {differences_text(data['ablation_comparisons'][name])}")
    lines.append("- Caption exact match under the irrelevant-images mix: "
                 + ", ".join(f"{a} {statistics.fmean(m['caption_exact_match'] for m in by(mixed, a)):.3f}"
                             for a in ATTENTION_KINDS) + ".")
    return "\n".join(lines)


# -- performance: results/bench_cpu.json, speedrun_log_cpu.json, time_to_accuracy_cpu.json -----------------


def _keyed(table: dict) -> dict:
    """A results table's rows by their stable keys (lists, such as [threads, load], become tuples)."""
    return {tuple(k) if isinstance(k, list) else k: row for k, row in zip(table["keys"], table["rows"])}


def _bench(results: Path) -> dict:
    """The committed benchmark's ratios: time and memory by (N, row key), the training step by attention."""
    tables = {t["title"].split(",")[0].split(":")[0]: t for t in _json(results, "bench_cpu.json")["tables"]}
    by_n = lambda table, column: {(row[0], key): row[column] for key, row in zip(table["keys"], table["rows"])}
    return {"time": by_n(tables["Attention time"], -1),
            "memory": by_n(tables["Peak memory growth during one forward+backward"], -1),
            "step": _keyed(tables["Tiny-model training step"]),
            "crossover": {n: row[-1] for n, row in _keyed(tables["Crossover"]).items()}}


def bench_figures(results: Path) -> str:
    b = _bench(results)
    t, m, s = b["time"], b["memory"], b["step"]
    return "\n".join([
        f"- Packed SIGMA attention, forward+backward: {t[4096, 'sigma_packed']:.3f}x standard causal SDPA at "
        f"N=4096 and {t[8192, 'sigma_packed']:.3f}x at N=8192; the same work by plain causal SDPA on the packed "
        f"shapes, {t[4096, 'packed_shapes']:.3f}x and {t[8192, 'packed_shapes']:.3f}x; the dense mask "
        f"{t[4096, 'sigma_sdpa']:.2f}x at 4096.",
        f"- SigmaAttention module: {t[4096, 'sigma_module']:.2f}x the StandardAttention module at N=4096 and "
        f"{t[8192, 'sigma_module']:.2f}x at 8192; with packing free {t[4096, 'sigma_module_packing_free']:.2f}x and "
        f"{t[8192, 'sigma_module_packing_free']:.2f}x; GatedAttention {t[4096, 'gated_module']:.2f}x at 4096.",
        f"- Training step of the tiny model: standard {s['standard'][1]:.1f} ms; SIGMA {s['sigma'][2]:.2f}x, Gated "
        f"{s['gated'][2]:.2f}x, " + (f"MODA {s['moda'][2]:.2f}x, " if "moda" in s else "") +
        f"a standard step plus the gate's bare arithmetic {s['gate_arithmetic'][2]:.2f}x.",
        f"- Peak memory growth: packed kernel {m[4096, 'sigma_packed']:.2f}x / {m[8192, 'sigma_packed']:.2f}x causal "
        f"SDPA at 4096 / 8192; SigmaAttention module {m[4096, 'sigma_module']:.2f}x / {m[8192, 'sigma_module']:.2f}x "
        f"the StandardAttention module.",
        f"- Crossover, packed over dense-mask sdpa: {b['crossover'][256]:.2f}x at 256 tokens, "
        f"{b['crossover'][384]:.2f}x at 384.",
    ])


def speedrun_figures(results: Path) -> str:
    threads, tta = (_keyed(t) for t in _json(results, "time_to_accuracy_cpu.json")["tables"])
    runs = _json(results, "time_to_accuracy_cpu.json")["runs"]["time_to_accuracy"]
    study = _keyed(_json(results, "stopping_rule_cpu.json")["tables"][0])
    log = _json(results, "speedrun_log_cpu.json")["tables"][0]["rows"]
    ratio = {key: row[-1] for key, row in threads.items()}
    seeds = sorted({r["seed"] for r in runs})
    below = lambda rule: study[rule][6]
    return "\n".join([
        f"- Stopping rule, replayed on {len(_json(results, 'stopping_rule_cpu.json')['runs']['check_curves'])} runs "
        f"(seeds the recipe was never tuned on): the old rule (98% of 200 validation scenes at one check every 50 "
        f"steps) stopped {below((0.98, 200, 50, 1))} run(s) below 95% test exact match, lowest "
        f"{study[0.98, 200, 50, 1][5]:.3f}; the `cpu` preset's rule now (98% of all 300 at two checks in a row, "
        f"25 steps apart) {below((0.98, 300, 25, 2))}, lowest {study[0.98, 300, 25, 2][5]:.3f}.",
        f"- Seeds {seeds[0]}-{seeds[-1]}, every attention trained with the `cpu` preset: test caption exact match "
        f"where training stopped {min(r['caption_exact_match'] for r in runs):.3f}-"
        f"{max(r['caption_exact_match'] for r in runs):.3f} ({sum(r['caption_exact_match'] >= 0.95 for r in runs)} "
        f"of {len(runs)} runs at 95% or more); stopped after {min(r['stopped_seconds'] for r in runs):.1f}-"
        f"{max(r['stopped_seconds'] for r in runs):.1f} s of training.",
        "- Time to 95% validation exact match (two checks in a row), medians: "
        + ", ".join(f"{attention} {row[1]:.1f} s ({row[4]} seeds)" for attention, row in tta.items())
        + f"; all runs {min(r['seconds'] for r in runs):.1f}-{max(r['seconds'] for r in runs):.1f} s, against "
        f"{log[0][1]:.0f} s for SIGMA before the speedrun.",
        f"- Threads, step time over one thread on an idle machine: two threads {ratio[2, 'idle']:.2f}x with the "
        f"other core idle and {ratio[2, 'busy']:.2f}x with it busy; one thread {ratio[1, 'busy']:.2f}x with it busy.",
    ])


# -- the package map: each module's own first sentence, in import order -------------------------------------

PACKAGE = ROOT / "sigma_ref"
MAP_ORDER = ("checks", "runtime", "masks", "kernels/", "attention", "moda", "model", "data", "evaluate", "probes",
             "var", "optim", "train", "viz", "widgets", "lab/", "teaching/", "testing/", "hf/")


def first_sentence(path: Path) -> str:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "."


def map_entries() -> list[tuple[str, Path]]:
    """(name as the map shows it, the file whose docstring describes it) for every entry of MAP_ORDER."""
    return [(f"`{name}`" if name.endswith("/") else f"`{name}.py`",
             PACKAGE / (f"{name}__init__.py" if name.endswith("/") else f"{name}.py")) for name in MAP_ORDER]


# -- VAR: results/var -------------------------------------------------------------------------------------


def var_tables(results: Path) -> str:
    paragraphs = (results / "var" / "results.md").read_text().split("\n\n")[1:]
    return "\n\n".join(p.strip() for p in paragraphs if p.strip())


def var_figures(results: Path) -> str:
    study = _json(results, "var/results.json")
    compare, dilution_runs = study["compare"], study["dilution"]
    ratios = [s["strongest_over_median"] for s in compare]
    changes = [abs(v["exact_match"] - s["caption"]["plain"]["exact_match"]) for s in compare for v in s["caption"]["var"].values()]
    tested = [s["confirmation"] for s in compare if s["confirmation"]["visual_sinks"]]
    root_d = study["tau"] * 64 / 20                          # tau = 20 sqrt(D / 4096)
    image_share = [s["above_tau"]["image"] for s in compare]
    lines = [f"- Sinks: over {len(compare)} models (every attention, seeds {study['seeds'][0]}-{study['seeds'][-1]}), "
             f"the strongest dimension is {min(ratios):.1f}-{max(ratios):.1f}x the median one and phi stays at or "
             f"below {max(s['phi_max'] for s in compare):.2f} (sqrt(D) = {root_d:.0f}); above tau = "
             f"{study['tau']:.2f}: {min(image_share):.1%}-{max(image_share):.1%} of image tokens.",
             f"- VAR applied over the grid moves caption exact match by at most {max(changes):.3f}."]
    if tested:
        more = lambda key: sum(t[key]["sinks"] > t[key]["other image"] for t in tested)
        worse = sum(t["caption_loss"]["sinks knocked out"] > t["caption_loss"]["as many random image tokens knocked out"]
                    for t in tested)
        lines.append(f"- The paper's tests on the flagged image tokens, of {len(tested)} models: the attention they "
                     f"receive varies more over the text queries than other image tokens' in {more('spread_over_queries')}, "
                     f"their contribution |alpha v W_O| is larger in {more('contribution')}, and knocking them out raises "
                     f"the caption loss more than knocking out as many random image tokens in {worse} (a sink would draw "
                     f"attention whatever the query, contribute little, and be removable).")
    if dilution_runs:
        largest = max(abs(v[k] - r["text_only"]["plain"][k]) for r in dilution_runs for v in r["text_only"]["var"].values()
                      for k in v)
        lines.append(f"- On the {len(dilution_runs)} dilution models, VAR moves a text-only accuracy by at most {largest:.3f}.")
    return "\n".join(lines)


def package_map(results: Path) -> str:
    rows = [f"| {name} | {first_sentence(path)} |" for name, path in map_entries()]
    return "\n".join(["| module | what it is (its docstring's first sentence) |", "|---|---|", *rows])


HF_VARIANTS = {"standard": "original (unconverted)", "sigma_nointra": "sigmafy, 0 intra heads (gates only)",
               "sigma": "sigmafy (2 of 4 heads intra, gates)", "sigma_nogates": "sigmafy, 2 intra heads, no gates"}


def _mean_sd(values) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def hf_finetune(results: Path) -> str:
    """The tiny LLaVA fine-tuned with transformers.Trainer (results/hf/finetune/<variant>_seed<N>/log.json)."""
    runs = {}
    for path in sorted((results / "hf" / "finetune").glob("*_seed*/log.json")):
        runs.setdefault(path.parent.name.rsplit("_seed", 1)[0], []).append(json.loads(path.read_text()))
    lines = ["| model | seeds | steps | test caption EM (mean ± sample std) | per seed | first validation check >= 90%, "
             "per seed: step (training s) |", "|---|---|---|---|---|---|"]
    for name, label in HF_VARIANTS.items():
        seeds = runs.get(name, [])
        if not seeds:
            continue
        tests = [run["test_caption_exact_match"] for run in seeds]
        first = [next((f"{c['step']} ({c['seconds']:.0f})" for c in run["validation_checks"]
                       if c["validation_caption_em"] >= 0.9), None) for run in seeds]
        lines.append(f"| {label} | {len(seeds)} | {seeds[0]['steps']} | {_mean_sd(tests)} | "
                     f"{', '.join(f'{t:.3f}' for t in tests)} | "
                     f"{', '.join('not reached' if t is None else t for t in first)} |")
    return "\n".join(lines)


def hf_bench(results: Path) -> str:
    """Forward + backward of the tiny LLaVA, original vs sigmafied (results/hf/bench_cpu.json)."""
    bench = _json(results, "hf/bench_cpu.json")
    lines = [f"Measured on {bench['device']}; medians of {bench['rows'][0]['repeats']} interleaved steps, peak "
             f"memory as the {bench['rows'][0]['measure']} (a fresh process per model).", "",
             "| tokens | original s | sigmafied s | time ratio | original peak MiB | sigmafied peak MiB | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in bench["rows"]:
        t, m = row["median_seconds"], row["peak_mib"]
        lines.append(f"| {row['length']} | {t['original']:.3f} | {t['sigma']:.3f} | {row['time_ratio']:.2f}x | "
                     f"{m['original']:.0f} | {m['sigma']:.0f} | {row['memory_ratio']:.2f}x |")
    return "\n".join(lines)


BLOCKS = {
    "package-map": package_map,
    "launch-badges": lambda results: launch.launch_badges(launch.repository_url(results.parent / "pyproject.toml")),
    "hf-finetune": hf_finetune,
    "hf-bench": hf_bench,
    "compare-table": compare_table,
    "compare-figures": compare_figures,
    "compare-differences": compare_differences,
    "seed-spread": seed_spread,
    "dilution-tables": dilution_tables,
    "dilution-figures": dilution_figures,
    "bench-tables": lambda results: _tables(results, "bench_cpu.json"),
    "bench-figures": bench_figures,
    "speedrun-log": lambda results: _tables(results, "speedrun_log_cpu.json"),
    "time-to-accuracy": lambda results: _tables(results, "time_to_accuracy_cpu.json"),
    "stopping-rule": lambda results: _tables(results, "stopping_rule_cpu.json"),
    "speedrun-figures": speedrun_figures,
    "var-tables": var_tables,
    "var-figures": var_figures,
}


def render(text: str, results: Path) -> str:
    """`text` with every generated block replaced by what the committed runs give."""
    def fill(match):
        name = match.group(1)
        if name not in BLOCKS:
            raise ValueError(f"block {name!r} is not one of {sorted(BLOCKS)}")
        return f"<!-- {name} -->\n{BLOCKS[name](results).strip()}\n<!-- /{name} -->"
    return BLOCK.sub(fill, text)


def stale_blocks(root: str | Path = ROOT) -> list[str]:
    """'document: block' for every block whose text differs from what the committed runs give."""
    root = Path(root)
    stale = []
    for document in DOCUMENTS:
        text = (root / document).read_text()
        fresh = dict(BLOCK.findall(render(text, root / "results")))
        stale += [f"{document}: {name}" for name, body in BLOCK.findall(text) if body != fresh[name]]
    return stale


def write(root: str | Path = ROOT) -> list[str]:
    """Regenerate every block of the documents; return the documents that changed."""
    root, changed = Path(root), []
    for document in DOCUMENTS:
        path = root / document
        text = path.read_text()
        new = render(text, root / "results")
        if new != text:
            path.write_text(new)
            changed.append(document)
    return changed
