"""VAR on the trained models: do they have visual sinks, and does redistributing attention change anything?

    python -m sigma_ref var --runs results/cpu --dilution results/dilution --seeds 3 --out results/var

For every attention and seed of a compare run (`--runs`), and every model of a dilution run (`--dilution`):
1. Sinks. The sink dimensions found from the residual stream entering the last layer (var.find_sink_dimensions),
   whether they recur across seeds, how strong the strongest is (its score over the median one; a massive
   activation is orders of magnitude above), and the phi distributions of image and text tokens against an
   isotropic null (a figure).
2. The paper's three confirmation tests, on the image tokens phi > tau flags: a sink draws attention whatever
   the query (the spread over text queries of the attention it receives, against other image tokens'); its
   contribution |alpha v W_O| is small; knocking it out leaves the caption loss unchanged where knocking out
   as many random image tokens hurts (the paper measures accuracy; a loss on the same sequences is what a
   per-sequence knock-out allows here).
3. VAR applied (var.redistributing, at the last layer: the paper's "layers 2..L-1" leaves none of 2 layers) over
   p in {0.4, 0.6} x rho in {0.5, 0.8, 0.9}: caption exact match and slot accuracy of the compare models, and
   the text-only accuracy with inserted image tokens of the dilution models of both training mixes.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from .. import data as D
from .. import probes, var
from ..checks import check_int
from ..evaluate import evaluate, load_model
from ..masks import IMAGE, TEXT
from ..runtime import TRAINING_THREADS, machine_description, torch_threads, write_atomic
from .dilution import KINDS, MIXES, _slug
from .experiments import ATTENTION_KINDS
from .runs import run_dir, run_in_workers

GRID = list(itertools.product((0.4, 0.6), (0.5, 0.8, 0.9)))           # (p, rho), the paper's convention
CAPTION_SCENES = 200
TEXT_ONLY_SCENES = 100
INSERTED = (16, 64)


def probe_batch(n: int = 200) -> dict:
    return D.collate([D.encode(s) for s in D.load_split("validation")[:n]])


def sink_report(model, batch: dict, tau: float) -> dict:
    """Sink dimensions at the last layer's input, their strength, phi by modality, and what phi > tau flags."""
    real = probes.real_tokens(batch)
    with torch.no_grad():
        states = model(batch, return_details=True).hidden_states[-2]             # [B, S, D] entering the last layer
    dims, scores = var.find_sink_dimensions(states[real], count=2)
    phi = var.sink_values(states, dims)                                            # [B, S]
    image, text = (batch["modality"] == IMAGE) & real, (batch["modality"] == TEXT) & real
    return {"dims": dims, "strongest_over_median": scores.max().item() / scores.median().item(),
            "phi_max": phi[real].max().item(),
            "above_tau": {"image": (phi[image] > tau).float().mean().item(), "text": (phi[text] > tau).float().mean().item()},
            "phi_quantiles": {name: torch.quantile(phi[mask], torch.tensor([0.5, 0.9, 0.99])).tolist()
                              for name, mask in (("image", image), ("text", text))},
            "phi_sample": {"image": phi[image][:2000].tolist(), "text": phi[text][:2000].tolist()},
            "sinks": (phi > tau) & real}


def confirmation_tests(model, batch: dict, sinks: torch.Tensor) -> dict:
    """The paper's three tests on the image tokens phi > tau flags in `batch`, at the last layer: the attention
    they receive from text queries and its spread over those queries, their contribution |alpha v W_O|, and the
    caption loss (teacher-forced, on the same batch) with every attention to them knocked out, against as many
    random other image tokens knocked out."""
    last, block = len(model.blocks) - 1, model.blocks[len(model.blocks) - 1]
    real = probes.real_tokens(batch)
    image = (batch["modality"] == IMAGE) & real
    visual, other = sinks & image, image & ~sinks
    if not bool(visual.any()):
        return {"visual_sinks": 0}
    with probes.math_backend(model), torch.no_grad():
        output = model(batch, return_details=True)
    probs = output.details[last].attn_probs                                      # [B, H, S, S]
    queries = ((batch["modality"] == TEXT) & real)[:, None, :, None].to(probs.dtype)       # text queries
    count = queries.sum(2).clamp_min(1)
    received = (probs * queries).sum(2) / count                                  # [B, H, S] mean over text queries
    spread = (((probs - received[:, :, None, :]) ** 2 * queries).sum(2) / count).sqrt()
    with torch.no_grad():
        values = block.attn.v_proj(block.norm_attn(output.hidden_states[last]))  # [B, S, D]
        contribution = received.mean(1) * (values @ block.attn.o_proj.weight.T).norm(dim=-1)

    def loss_without(chosen: torch.Tensor) -> float:
        """Caption loss with every attention to the chosen key positions removed (rows renormalised)."""
        def knock_out(probs):
            kept = probs * ~chosen[:, None, None, :]
            return kept / kept.sum(-1, keepdim=True).clamp_min(1e-12)
        block.attn.probs_edit = knock_out
        try:
            with torch.no_grad():
                return model(batch).loss.item()
        finally:
            block.attn.probs_edit = None

    generator = torch.Generator().manual_seed(0)
    random_tokens = torch.zeros_like(visual)
    for row in range(visual.shape[0]):
        candidates = other[row].nonzero().flatten()
        random_tokens[row, candidates[torch.randperm(len(candidates), generator=generator)[:int(visual[row].sum())]]] = True
    with torch.no_grad():
        plain_loss = model(batch).loss.item()
    pair = lambda t: {"sinks": t[visual].mean().item(), "other image": t[other].mean().item()}
    return {"visual_sinks": int(visual.sum()), "received": pair(received.mean(1)), "spread_over_queries": pair(spread.mean(1)),
            "contribution": pair(contribution),
            "caption_loss": {"plain": plain_loss, "sinks knocked out": loss_without(visual),
                             "as many random image tokens knocked out": loss_without(random_tokens)}}


def _study_compare_model(job: dict) -> dict:
    with torch_threads(TRAINING_THREADS):
        model = load_model(job["checkpoint"])
        batch = probe_batch()
        report = sink_report(model, batch, job["tau"])
        tests = confirmation_tests(model, batch, report.pop("sinks"))
        test = D.load_split("test")[:CAPTION_SCENES]
        plain = evaluate(model, test)
        applied = {}
        for p, rho in GRID:
            with var.redistributing(model, report["dims"], job["tau"], p=p, rho=rho, layers=[len(model.blocks) - 1]):
                r = evaluate(model, test)
            applied[f"p={p} rho={rho}"] = {"exact_match": r["exact_match"], "slot_accuracy": r["slot_accuracy"]}
    return {"attention": job["attention"], "seed": job["seed"], **report, "confirmation": tests,
            "caption": {"plain": {"exact_match": plain["exact_match"], "slot_accuracy": plain["slot_accuracy"]},
                        "var": applied}}


def _study_dilution_model(job: dict) -> dict:
    with torch_threads(TRAINING_THREADS):
        model = load_model(job["checkpoint"])
        report = sink_report(model, probe_batch(), job["tau"])
        report.pop("sinks")
        text_only = D.load_split("text_only")[:TEXT_ONLY_SCENES]
        measure = lambda: {f"{kind} {n}": evaluate(model, text_only, n, kind)["exact_match"] for kind in KINDS for n in INSERTED}
        plain, applied = measure(), {}
        for p, rho in GRID:
            with var.redistributing(model, report["dims"], job["tau"], p=p, rho=rho, layers=[len(model.blocks) - 1]):
                applied[f"p={p} rho={rho}"] = measure()
    return {"attention": job["attention"], "seed": job["seed"], "train_mix": job["train_mix"], "dims": report["dims"],
            "text_only": {"plain": plain, "var": applied}}


def recurring_dims(reports: list[dict]) -> list[int]:
    """Dimensions found on every seed (sorted)."""
    sets = [set(r["dims"]) for r in reports]
    return sorted(set.intersection(*sets)) if sets else []


def sink_phi_figure(phi: dict, tau: float, hidden_size: int, title: str):
    """One panel per model: histograms of phi (var.sink_values) for image and text tokens, beside an isotropic
    Gaussian state of the same width on two fixed dimensions, with the threshold tau dashed.

    phi: {panel title: {"image": values, "text": values}} (tensors or lists).
    """
    fig, axes = plt.subplots(1, len(phi), figsize=(3.2 * len(phi), 3), sharey=True, constrained_layout=True,
                             squeeze=False)
    null = var.sink_values(torch.randn(20_000, hidden_size, generator=torch.Generator().manual_seed(0)), [0, 1])
    bins = torch.linspace(0, hidden_size ** 0.5, 41).numpy()
    for ax, (name, values) in zip(axes[0], phi.items()):
        for data, label, colour in ((values["image"], "image tokens", "tab:orange"),
                                    (values["text"], "text tokens", "tab:blue"), (null, "isotropic null", "0.5")):
            ax.hist(np.asarray(data, dtype=float), bins=bins, density=True, histtype="step", lw=1.5, label=label,
                    color=colour)
        ax.axvline(tau, color="k", ls="--", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("phi on the 2 dimensions found")
    axes[0, 0].set_ylabel("density")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{title} (dashed: tau = {tau:.1f}; sqrt(D) = {hidden_size ** 0.5:.0f})", fontsize=10)
    return fig


def phi_figure(studies: list[dict], tau: float, hidden_size: int):
    """phi of image and text tokens entering the last layer, per attention (its first seed), against the null."""
    first = {}
    for study in sorted(studies, key=lambda s: s["seed"]):
        first.setdefault(study["attention"], study)
    return sink_phi_figure({f"{a}, seed {s['seed']}": s["phi_sample"] for a, s in first.items()}, tau, hidden_size,
                               "phi entering the last layer")


def tables(studies: list[dict], dilution_studies: list[dict], tau: float) -> str:
    mean = statistics.fmean
    lines = [f"Sinks at the last layer's input (tau = {tau:.2f}, the published 20 scaled to D; seeds pooled):", "",
             "| attention | dims per seed | recur on every seed | strongest / median | phi max | above tau: image | text |",
             "|---|---|---|---|---|---|---|"]
    for a in ATTENTION_KINDS:
        rs = [s for s in studies if s["attention"] == a]
        if rs:
            lines.append(f"| {a} | {' '.join(str(r['dims']) for r in rs)} | {recurring_dims(rs) or 'none'} | "
                         f"{mean(r['strongest_over_median'] for r in rs):.2f} | {max(r['phi_max'] for r in rs):.2f} | "
                         f"{mean(r['above_tau']['image'] for r in rs):.3f} | {mean(r['above_tau']['text'] for r in rs):.3f} |")
    lines += ["", "Caption exact match without and with VAR (last layer), mean over seeds:", "",
              "| attention | plain | " + " | ".join(f"p={p} rho={rho}" for p, rho in GRID) + " |", "|---" * (2 + len(GRID)) + "|"]
    for a in ATTENTION_KINDS:
        rs = [s for s in studies if s["attention"] == a]
        if rs:
            cells = [f"{mean(r['caption']['plain']['exact_match'] for r in rs):.3f}"]
            cells += [f"{mean(r['caption']['var'][f'p={p} rho={rho}']['exact_match'] for r in rs):.3f}" for p, rho in GRID]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if dilution_studies:
        lines += ["", "Text-only accuracy with inserted image tokens, dilution models, without VAR and with its largest "
                  "change over the grid (mean over seeds):", "",
                  "| trained on | attention | " + " | ".join(f"{k} {n}" for k in KINDS for n in INSERTED) + " | largest change with VAR |",
                  "|---" * (3 + len(KINDS) * len(INSERTED)) + "|"]
        for mix in MIXES:
            for a in ATTENTION_KINDS:
                rs = [s for s in dilution_studies if s["attention"] == a and s["train_mix"] == mix]
                if rs:
                    keys = [f"{k} {n}" for k in KINDS for n in INSERTED]
                    plain = [mean(r["text_only"]["plain"][k] for r in rs) for k in keys]
                    change = max(abs(mean(r["text_only"]["var"][g][k] for r in rs) - plain[i])
                                 for g in rs[0]["text_only"]["var"] for i, k in enumerate(keys))
                    lines.append(f"| {mix} | {a} | " + " | ".join(f"{v:.3f}" for v in plain) + f" | {change:.3f} |")
    return "\n".join(lines)


def run_var_study(runs: str | Path, seeds: int, out: str | Path, dilution_dir: str | Path | None = None,
                  workers: int | None = None, progress: bool = True) -> dict:
    """Every study above on the checkpoints of `runs` (and of `dilution_dir`); writes results.json, results.md
    and phi_distributions.png to `out`."""
    check_int("seeds", seeds, low=1)
    runs, out = Path(runs), Path(out)
    jobs = [{"attention": a, "seed": s, "checkpoint": run_dir(runs, a, s) / "checkpoint.pt"}
            for a in ATTENTION_KINDS for s in range(seeds)]
    missing = [str(j["checkpoint"]) for j in jobs if not j["checkpoint"].exists()]
    if missing:
        raise ValueError(f"runs: no checkpoint at {missing[0]} (and {len(missing) - 1} more); train them with "
                         f"`python -m sigma_ref compare --seeds {seeds} --out {runs}`")
    hidden_size = load_model(jobs[0]["checkpoint"]).config.hidden_size
    tau = var.equivalent_tau(hidden_size)
    jobs = [dict(job, tau=tau) for job in jobs]
    studies = run_in_workers(_study_compare_model, jobs, workers, "VAR on the compare models", progress)
    dilution_studies = []
    if dilution_dir is not None:
        djobs = [{"attention": a, "seed": s, "tau": tau, "train_mix": mix,
                  "checkpoint": Path(dilution_dir) / _slug(mix) / f"{_slug(a)}_seed{s}" / "checkpoint.pt"}
                 for mix in MIXES for a in ATTENTION_KINDS for s in range(seeds)]
        djobs = [j for j in djobs if j["checkpoint"].exists()]
        dilution_studies = run_in_workers(_study_dilution_model, djobs, workers, "VAR on the dilution models", progress)
    out.mkdir(parents=True, exist_ok=True)
    fig = phi_figure(studies, tau, hidden_size)
    fig.savefig(out / "phi_distributions.png", dpi=110)
    plt.close(fig)
    for study in studies:
        study.pop("phi_sample")                        # drawn above; the quantiles stay in the results
    report = tables(studies, dilution_studies, tau)
    write_atomic(out / "results.md", f"VAR on the trained models; machine: {machine_description()}\n\n{report}\n")
    write_atomic(out / "results.json", json.dumps({"machine": machine_description(), "tau": tau, "grid": GRID,
                                                   "seeds": list(range(seeds)), "compare": studies,
                                                   "dilution": dilution_studies}, indent=1))
    print(report)
    return {"compare": studies, "dilution": dilution_studies}
