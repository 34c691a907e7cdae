"""Does SIGMA stop the dilution? The seed's central claim, tested the way it was made, with SIGMA's ablations.

    python -m sigma_ref dilution --seeds 3 --out results/dilution              # 3 attentions x 2 mixes x seeds
    python -m sigma_ref dilution --seeds 3 --ablations --out results/dilution  # adds SIGMA's ablation grid

THE CLAIM. Many image tokens dilute the text's attention, so even a blank image can hurt a text task; SIGMA's
intra heads keep text-to-text attention pure, and its gates can close the cross-modal stream when it is not
needed. THE TEST. The text-only "expand" task with 0 .. 8k blank or noise image tokens inserted. Two training
mixes, so the test can tell dilution from a model meeting something it never saw:
    text only           (the control) text-only samples never carry image tokens: any inserted token is out of
                        distribution, and the probe measures a breakdown as much as dilution;
    irrelevant images   text-only samples carry 0..k blank or noise image tokens at random places in the
                        attribute list: images that say nothing are in distribution up to k, and 2k..8k test
                        how far the learned indifference reaches.
Every model is the `cpu` preset's recipe (only the mix changes), trained to its stopping rule.

THE MECHANISM, per layer and head: the attention mass that text queries put on the irrelevant image keys, and
the gates on text tokens in expand samples without and with images and in describe samples, over training.

Each run is written to OUT/<mix>/<variant>_seed<k>/ (checkpoint and metrics) and reused when present, so an
interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .. import data as D
from .. import probes, viz
from ..checks import check_choice, check_int
from ..evaluate import exact_match
from .experiments import ATTENTION_KINDS, comparison_table, differences_figure
from .runs import run_in_workers
from ..masks import IMAGE, TEXT
from . import stats
from ..runtime import TRAINING_THREADS, machine_description, torch_threads, write_atomic
from ..train import Trainer, get_preset

MAX_TRAIN_IMAGES = 16
MIXES = {"text only": 0, "irrelevant images": MAX_TRAIN_IMAGES}
KINDS = ("blank", "noise")
TEXT_ONLY_SAMPLES = 150          # scenes of the text_only split per (count, kind)

# SIGMA's parts as switches (AttentionConfig fields; a split per layer is ModelConfig.intra_heads_per_layer), each trained under the irrelevant-images mix. H=4, L=2.
ABLATIONS = {
    "sigma": {},
    "1 intra head": {"num_intra_heads": 1},
    "3 intra heads": {"num_intra_heads": 3},
    "0 intra heads": {"num_intra_heads": 0},
    "intra heads in the first layer only": {"num_intra_heads": (2, 0)},
    "gates off": {"use_gates": False},
    "stream bias off": {"use_stream_bias": False},
    "bias init 0": {"bias_init": ((0.0, 0.0), (0.0, 0.0))},
}
# MODA's parts likewise (moda.py): each part off, and the form its authors released (K^T V Gram matrix, image
# keys aligned to text only, summed over the whole sequence, default fuser init, no mask).
MODA_ABLATIONS = {
    "moda": {},
    "moda, alignment off": {"moda_align": False},
    "moda, pseudo-logit off": {"moda_pseudo_logit": False},
    "moda as released": {"moda_gram": "kv", "moda_duplex": False, "moda_causal": False,
                         "moda_fuser_init": "released", "moda_pseudo_logit": False},
}


def inserted_counts(k: int = MAX_TRAIN_IMAGES) -> tuple[int, ...]:
    """0, k/2, k, 2k, 4k, 8k: inside what training showed, and far beyond it."""
    return (0, k // 2, k, 2 * k, 4 * k, 8 * k)


def _slug(text: str) -> str:
    return text.replace(" ", "_")


def expand_batch(inserted: int, kind: str = "blank", size: int = 48, at: int | None = None) -> dict:
    """Validation-style expand samples (text_only split) with `inserted` image tokens, for the probes."""
    generator = torch.Generator().manual_seed(0)
    return D.collate([D.encode(s, inserted, kind, generator, at) for s in D.load_split("text_only")[:size]])


@torch.no_grad()
def irrelevant_image_mass(model, batch: dict) -> list[list[float]]:
    """[L][H]: mean attention mass that text queries after the inserted images put on image keys."""
    model.eval()
    with probes.math_backend(model):
        details = model(batch, return_details=True).details
    real = probes.real_tokens(batch)
    image = (batch["modality"] == IMAGE) & real
    queries = (batch["modality"] == TEXT) & real & (image.long().cumsum(1) > 0)
    return [[float((d.attn_probs[:, h] * image[:, None, :]).sum(-1)[queries].mean()) for h in range(d.attn_probs.shape[1])]
            for d in details]


def gate_profile(model) -> dict:
    """Mean gate on TEXT tokens per layer and stream: expand without images, expand with k, describe."""
    batches = {"expand": expand_batch(0), "expand + images": expand_batch(MAX_TRAIN_IMAGES),
               "describe": probes.probe_batch()}
    return {name: [{stream: v.get("text") for stream, v in layer.items()} for layer in probes.gate_means(model, batch)]
            for name, batch in batches.items()}


def _has_gates(model) -> bool:
    return any(getattr(block.attn, name, None) is not None for block in model.blocks
               for name in ("gate_proj", "gate_intra_proj", "gate_global_proj"))


def _job(job: dict) -> dict:
    """Train one model (or reuse it) and measure it; runs in a worker process."""
    with torch_threads(TRAINING_THREADS):
        return _train_and_measure(**job)


def _train_and_measure(attention: str, variant: str, overrides: dict, seed: int, train_mix: str, out_dir: str,
                       counts: tuple, preset: str = "cpu", text_only_samples: int = TEXT_ONLY_SAMPLES) -> dict:
    config = get_preset(preset).updated(max_irrelevant_images=MIXES[train_mix])
    path = Path(out_dir) / _slug(train_mix) / f"{_slug(variant)}_seed{seed}"
    wanted = {"config": config.updated(attention=attention, **overrides).as_dict(),
              "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
              "attention": attention, "counts": list(counts), "text_only_samples": text_only_samples}
    try:
        saved = json.loads((path / "metrics.json").read_text())
        if {k: saved.get(k) for k in wanted} == json.loads(json.dumps(wanted)):
            return saved
    except (OSError, json.JSONDecodeError):
        pass
    trainer = Trainer(attention, config, seed, path, device="cpu", model_overrides=overrides)
    if trainer.checkpoint_path.exists():
        try:
            trainer.load(trainer.checkpoint_path)
        except ValueError:                                        # another recipe: start afresh
            trainer = Trainer(attention, config, seed, path, device="cpu", model_overrides=overrides)
    trainer.run(progress=False)
    model = trainer.model.eval()
    text_only = D.load_split("text_only")[:text_only_samples]
    measured = {kind: {str(n): exact_match(model, text_only, n, kind) for n in counts} for kind in KINDS}
    metrics = {**wanted, "variant": variant, "seed": seed, "train_mix": train_mix,
               "max_train_images": MIXES[train_mix], "steps": trainer.step, "train_seconds": trainer.train_seconds,
               "target_reached": trainer.target_reached,
               "caption_exact_match": exact_match(model, D.load_split("test")[:300])["exact_match"],
               "accuracy": {kind: {n: r["exact_match"] for n, r in rows.items()} for kind, rows in measured.items()},
               "loss": {kind: {n: r["loss"] for n, r in rows.items()} for kind, rows in measured.items()},
               "image_mass": irrelevant_image_mass(model, expand_batch(MAX_TRAIN_IMAGES)),
               "streams": [probes.head_streams(model, layer) for layer in range(len(model.blocks))],
               "gates": gate_profile(model) if _has_gates(model) else None,
               "gate_history": trainer.gate_history}
    write_atomic(path / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def records(metrics: list[dict]) -> list[dict]:
    """One record per (model, inserted kind), as results.json holds them: accuracy and loss by count."""
    out = []
    for m in metrics:
        for kind in m["accuracy"]:
            out.append({"attention": m["attention"], "variant": m["variant"], "seed": m["seed"],
                        "train_mix": m["train_mix"], "max_train_images": m["max_train_images"], "kind": kind,
                        "accuracy": m["accuracy"][kind], "loss": m["loss"][kind],
                        "caption_exact_match": m["caption_exact_match"], "train_seconds": m["train_seconds"],
                        "steps": m["steps"]})
    return out


def _by(metrics: list[dict], **where) -> list[dict]:
    return sorted((m for m in metrics if all(m[k] == v for k, v in where.items())), key=lambda m: m["seed"])


def main_table(metrics: list[dict], counts) -> str:
    """Per mix and attention: caption EM, then text-only accuracy at each count (blank / noise), mean ± std."""
    shown = [counts[0], counts[2], counts[4], counts[5]]
    header = "| trained on | attention | caption EM | " + " | ".join(f"{kind} {n}" for kind in KINDS for n in shown) + " |"
    lines = [header, "|---" * (3 + len(KINDS) * len(shown)) + "|"]
    for mix in MIXES:
        for attention in ATTENTION_KINDS:
            runs = _by(metrics, train_mix=mix, variant=attention)
            if runs:
                cells = [stats.summary_text([r["caption_exact_match"] for r in runs])]
                cells += [stats.summary_text([r["accuracy"][kind][str(n)] for r in runs]) for kind in KINDS for n in shown]
                lines.append(f"| {mix} | {attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The counts beyond what the irrelevant-images mix trained on (0..16) at which SIGMA is compared with each
# baseline: the seed's claim is about what happens past the training range.
COMPARED_COUNTS = (64, 128)


def comparisons(metrics: list[dict]) -> list[dict]:
    """SIGMA minus each other attention, seed by seed, trained with irrelevant images: the caption exact match
    (what robustness costs), then the text-only accuracy at COMPARED_COUNTS of each kind; mean difference,
    interval, wins, sign-flip p, Holm-corrected over these comparisons together."""
    compared = []
    mixed = "irrelevant images"
    for baseline in (a for a in ATTENTION_KINDS if a != "sigma"):
        sigma, other = _by(metrics, train_mix=mixed, variant="sigma"), _by(metrics, train_mix=mixed, variant=baseline)
        if sigma and other:
            compared.append({"metric": "caption EM", "a": "sigma", "b": baseline, **stats.paired_comparison(
                [r["caption_exact_match"] for r in sigma], [r["caption_exact_match"] for r in other])})
    for kind in KINDS:
        for n in COMPARED_COUNTS:
            for baseline in (a for a in ATTENTION_KINDS if a != "sigma"):
                sigma, other = _by(metrics, train_mix=mixed, variant="sigma"), _by(metrics, train_mix=mixed, variant=baseline)
                if sigma and other:
                    compared.append({"metric": f"{n} {kind}", "a": "sigma", "b": baseline, **stats.paired_comparison(
                        [r["accuracy"][kind][str(n)] for r in sigma], [r["accuracy"][kind][str(n)] for r in other])})
    return stats.with_holm(compared)


def ablation_comparisons(metrics: list[dict], ablations: dict = ABLATIONS) -> list[dict]:
    """Each variant of a grid minus the full model (the grid's first entry), seed by seed, on the caption exact
    match and the text-only accuracy at 64 blank and 128 noise tokens; one Holm family per grid."""
    full = next(iter(ablations))
    mixed, compared = "irrelevant images", []
    reading = {"caption EM": lambda r: r["caption_exact_match"], "64 blank": lambda r: r["accuracy"]["blank"]["64"],
               "128 noise": lambda r: r["accuracy"]["noise"]["128"]}
    for variant in list(ablations)[1:]:
        runs, own = _by(metrics, train_mix=mixed, variant=variant), _by(metrics, train_mix=mixed, variant=full)
        if runs and own:
            for name, read in reading.items():
                compared.append({"metric": name, "a": variant, "b": full,
                                 **stats.paired_comparison([read(r) for r in runs], [read(r) for r in own])})
    return stats.with_holm(compared)


def ablation_table(metrics: list[dict], counts, ablations: dict = ABLATIONS, name: str = "SIGMA") -> str:
    lines = [f"| {name} variant (trained with irrelevant images) | caption EM | " +
             " | ".join(f"{kind} {n}" for kind in KINDS for n in (counts[2], counts[4], counts[5])) + " |",
             "|---" * (2 + 3 * len(KINDS)) + "|"]
    for variant in ablations:
        runs = _by(metrics, train_mix="irrelevant images", variant=variant)
        if runs:
            cells = [stats.summary_text([r["caption_exact_match"] for r in runs])]
            cells += [stats.summary_text([r["accuracy"][kind][str(n)] for r in runs]) for kind in KINDS for n in (counts[2], counts[4], counts[5])]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mechanism_table(metrics: list[dict]) -> str:
    """Per mix and model: text queries' mass on the 16 irrelevant image keys (global heads, per layer) and
    the global gate on text tokens: expand without images, with 16, describe (per layer, mean over seeds)."""
    lines = ["| trained on | attention | mass on irrelevant images (global heads), per layer | global gate on text: "
             "expand | expand + 16 images | describe |", "|---|---|---|---|---|---|"]
    for mix in MIXES:
        for attention in ATTENTION_KINDS:
            runs = _by(metrics, train_mix=mix, variant=attention)
            if not runs:
                continue
            layers = len(runs[0]["image_mass"])
            mass = [statistics.fmean(statistics.fmean(m for m, s in zip(r["image_mass"][layer], r["streams"][layer])
                                                      if s == "global") for r in runs) for layer in range(layers)]
            gates = []
            for probe in ("expand", "expand + images", "describe"):
                if runs[0]["gates"] is None:
                    gates.append("-")
                    continue
                per_layer = [statistics.fmean(r["gates"][probe][layer]["global"] for r in runs) for layer in range(layers)]
                gates.append(" / ".join(f"{g:.2f}" for g in per_layer))
            lines.append(f"| {mix} | {attention} | {' / '.join(f'{m:.2f}' for m in mass)} | " + " | ".join(gates) + " |")
    return "\n".join(lines)


def accuracy_curves(metrics: list[dict], counts) -> dict:
    """{(mix, kind): {attention: per-seed lists of accuracy over counts}}, what dilution_curves_figure draws."""
    return {(mix, kind): {a: [[r["accuracy"][kind][str(n)] for n in counts] for r in _by(metrics, train_mix=mix, variant=a)]
                          for a in ATTENTION_KINDS if _by(metrics, train_mix=mix, variant=a)}
            for mix in MIXES for kind in KINDS}


def gate_histories(metrics: list[dict]) -> dict:
    """{attention: per-seed gate histories} of the gated models trained with irrelevant images."""
    return {a: [r["gate_history"] for r in _by(metrics, train_mix="irrelevant images", variant=a)] for a in ("gated", "sigma")}


def ablation_values(metrics: list[dict], count: int, kind: str = "noise") -> dict:
    """{variant: per-seed text-only accuracy with `count` inserted tokens} for every variant that was trained."""
    variants = {v: _by(metrics, train_mix="irrelevant images", variant=v) for v in ABLATIONS}
    return {v: [r["accuracy"][kind][str(count)] for r in runs] for v, runs in variants.items() if runs}


def figures(metrics: list[dict], counts) -> dict:
    """{file name: Figure} of a dilution run (viz draws; this picks the data)."""
    out = {"dilution_curves.png": viz.dilution_curves_figure(accuracy_curves(metrics, counts), counts, MAX_TRAIN_IMAGES,
                                                                  stats.bootstrap_interval)}
    compared = comparisons(metrics)
    if compared:
        out["differences.png"] = differences_figure(compared, {}, "SIGMA minus each attention, trained with "
                                                    "irrelevant images: text-only exact match")
    histories = gate_histories(metrics)
    if all(histories.values()):
        out["text_gates.png"] = viz.text_gates_figure(histories, "Global gate on text tokens during training "
                                                                  "(irrelevant-images mix, mean over layers and seeds)")
    values = ablation_values(metrics, counts[4])
    if len(values) > 1:
        out["ablations.png"] = viz.ablation_figure(values, f"text-only exact match with {counts[4]} noise image tokens",
                                                   f"SIGMA's parts, trained with 0..{MAX_TRAIN_IMAGES} irrelevant image tokens")
    return out


def run_dilution(seeds: int = 3, out_dir: str | Path = "results/dilution", ablations: bool = False,
                 workers: int | None = None, progress: bool = True, preset: str = "cpu",
                 text_only_samples: int = TEXT_ONLY_SAMPLES, attentions=ATTENTION_KINDS) -> list[dict]:
    """Train (or reuse) every model of the experiment; write results.json, results.md and the figures.
    `attentions` chooses the attentions (and so the ablation grids: SIGMA's with sigma, MODA's with moda)."""
    check_int("seeds", seeds, low=1)
    for attention in attentions:
        check_choice("attentions entry", attention, ATTENTION_KINDS)
    out_dir, counts = Path(out_dir), inserted_counts()
    common = {"out_dir": str(out_dir), "counts": counts, "preset": preset, "text_only_samples": text_only_samples}
    jobs = [{"attention": a, "variant": a, "overrides": {}, "seed": s, "train_mix": mix, **common}
            for s in range(seeds) for mix in MIXES for a in attentions]
    if ablations:
        jobs += [{"attention": attention, "variant": v, "overrides": o, "seed": s, "train_mix": "irrelevant images",
                  **common}
                 for attention, grid in (("sigma", ABLATIONS), ("moda", MODA_ABLATIONS)) if attention in attentions
                 for s in range(seeds) for v, o in grid.items() if v != attention]
    metrics = run_in_workers(_job, jobs, workers, "dilution", progress)
    compared = comparisons(metrics)
    ablation_compared = {"SIGMA": ablation_comparisons(metrics, ABLATIONS) if ablations else [],
                         "MODA": ablation_comparisons(metrics, MODA_ABLATIONS) if ablations else []}
    report = (f"Dilution experiment: `{preset}` preset, seeds 0-{seeds - 1}, text-only split ({text_only_samples} scenes "
              f"per cell); machine: {machine_description()}\n\n## Accuracy (mean ± sample std [95% bootstrap "
              f"interval] over seeds)\n\n{main_table(metrics, counts)}\n\n## SIGMA against the baselines, seed by seed "
              f"(trained with irrelevant images; Holm's correction over the table; * significant at 5%)\n\n"
              f"{comparison_table(compared, {})}\n\n## Mechanism\n\n{mechanism_table(metrics)}\n")
    if ablations:
        report += (f"\n## SIGMA's parts\n\n{ablation_table(metrics, counts)}\n\nEach part against SIGMA, seed by "
                   f"seed:\n\n{comparison_table(ablation_compared['SIGMA'], {})}\n"
                   f"\n## MODA's parts\n\n{ablation_table(metrics, counts, MODA_ABLATIONS, 'MODA')}\n\nEach part "
                   f"against MODA, seed by seed:\n\n{comparison_table(ablation_compared['MODA'], {})}\n")
    write_atomic(out_dir / "results.md", report)
    write_atomic(out_dir / "results.json", json.dumps(
        {"machine": machine_description(), "seeds": list(range(seeds)), "counts": list(counts),
         "max_train_images": MAX_TRAIN_IMAGES, "comparisons": compared, "ablation_comparisons": ablation_compared,
         "correction": {"method": "holm", "alpha": 0.05, "families": ["comparisons", "ablation_comparisons.SIGMA",
                                                                     "ablation_comparisons.MODA"]},
         "runs": records(metrics),
         "models": [{k: m[k] for k in ("attention", "variant", "seed", "train_mix", "overrides", "image_mass",
                                       "streams", "gates", "gate_history", "caption_exact_match", "train_seconds")}
                    for m in metrics]}, indent=1))
    for name, fig in figures(metrics, counts).items():
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
    print(report)
    return metrics


def load_metrics(out_dir: str | Path = "results/dilution") -> tuple[list[dict], tuple]:
    """A finished run's models, rebuilt from results.json (records joined per model), and its counts."""
    results = json.loads((Path(out_dir) / "results.json").read_text())
    models = {(m["variant"], m["seed"], m["train_mix"]): dict(m, accuracy={}, loss={}) for m in results["models"]}
    for record in results["runs"]:
        model = models[record["variant"], record["seed"], record["train_mix"]]
        model["accuracy"][record["kind"]] = record["accuracy"]
        model["loss"][record["kind"]] = record["loss"]
        model["max_train_images"] = record["max_train_images"]
    return list(models.values()), tuple(results["counts"])
