"""The speedrun: how fast does each model LEARN the task? Time-to-accuracy, the recipe's log, and threads.

    python -m sigma_ref bench --time-to-accuracy     # time to 95% caption exact match, every attention, 3 seeds
    python -m sigma_ref bench --speedrun-log         # each recipe change against the one before it (SIGMA)
    python -m sigma_ref bench --threads              # a training step with 1 and 2 threads, other core idle/busy

Time-to-accuracy is the honest speed of a training recipe: a faster step that needs more steps is no faster.
A run trains with the recipe's own schedule and step budget and stops the first time its validation caption
exact match (200 scenes, greedy decoding, checked every `target_every` steps) reaches the target; the time is
training time only (the checks are the measurement, not the training). Runs go two at a time, one thread
each, as `compare` trains them (runtime.py's thread policy), so the times are what a learner's compare sees.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time

from tqdm.auto import tqdm

from .bench import Table, interleaved_medians
from ..data import DataStream
from .. import data as D
from ..evaluate import evaluate
from .experiments import ATTENTION_KINDS, default_workers, run_in_workers
from ..runtime import TRAINING_THREADS, torch_threads
from ..attention import AttentionConfig
from ..model import ModelConfig
from ..train import TrainConfig, Trainer, get_preset

# The recipe's history, one change at a time; each rung keeps every change above it. The first rung is the
# `cpu` preset before the speedrun; the last is the `cpu` preset now (tests/test_speedrun.py checks that).
LADDER = [
    ("before: D=96, L=3, AdamW lr 3e-3, 3000-step schedule",
     TrainConfig(ModelConfig(attn=AttentionConfig(hidden_size=96, num_heads=4), num_layers=3, **D.model_fields()),
                 steps=3000, batch_size=48, eval_every=250, checkpoint_every=500)),
    ("Muon for the blocks' weight matrices", dict(optimizer="muon")),
    ("smaller model D=64, L=2; lr 6e-3, 800-step schedule", dict(hidden_size=64, num_layers=2, lr=6e-3, steps=800)),
    ("conv patch encoder (3x3 conv + GELU in each patch)", dict(patch_encoder="conv")),
    ("20 warm-up steps (not 50)", dict(warmup_steps=20)),
    ("Muon also for the patch projection", dict(muon_scope="blocks+patch")),
    ("Muon momentum 0.9 (not 0.95)", dict(muon_momentum=0.9)),
    ("10% text-only samples (not 25%)", dict(text_only_fraction=0.1)),
    ("600-step schedule (not 800)", dict(steps=600)),
    ("MLP as wide as the model (not 4x), all three attentions", dict(mlp_ratio=1)),
    ("lr 1e-2 (not 6e-3)", dict(lr=1e-2)),
]


def ladder_recipes() -> list[tuple[str, TrainConfig]]:
    """[(change, recipe)] with each rung's changes applied on top of the rung before."""
    recipes, recipe = [], None
    for change, step in LADDER:
        recipe = step if isinstance(step, TrainConfig) else recipe.updated(**step)
        recipes.append((change, recipe))
    return recipes


def _time_to_target(job: dict) -> dict:
    """One training to the target in a worker process; its time, step and the model's test metrics."""
    with torch_threads(TRAINING_THREADS):
        trainer = Trainer(job["attention"], job["config"], job["seed"], device="cpu")
        trainer.run(progress=False)
        caption = evaluate(trainer.model, D.load_split("test")[:500])["exact_match"]
        compositional = evaluate(trainer.model, D.load_split("compositional"))["exact_match"]
    reached = trainer.target_reached
    return {"attention": job["attention"], "seed": job["seed"], "reached": reached is not None,
            "seconds": reached["train_seconds"] if reached else trainer.train_seconds,
            "step": reached["step"] if reached else trainer.step,
            "caption_exact_match": caption, "compositional_exact_match": compositional}


def run_to_target(jobs: list[dict], workers: int | None = None, progress: bool = True) -> list[dict]:
    """Train every job ({"attention", "seed", "config"}) until its target, `workers` at a time. The job order
    interleaves what is compared, so slow and fast minutes of the machine land on all of them."""
    return run_in_workers(_time_to_target, jobs, workers, "time to target", progress)


def _summary(results: list[dict]) -> list:
    seconds = [r["seconds"] for r in results]
    return [statistics.median(seconds), min(seconds), max(seconds),
            f"{sum(r['reached'] for r in results)}/{len(results)}", statistics.median(r["step"] for r in results),
            statistics.fmean(r["caption_exact_match"] for r in results),
            statistics.fmean(r["compositional_exact_match"] for r in results)]


COLUMNS = ["median s", "min s", "max s", "reached", "median step", "test caption EM", "compositional EM"]


def time_to_accuracy_table(preset: str = "cpu", seeds: int = 3, target: float = 0.95, workers: int | None = None,
                           progress: bool = True) -> tuple[Table, list[dict]]:
    """Time to `target` validation caption exact match for each attention, seeds 0..seeds-1, side by side."""
    config = get_preset(preset).updated(target_exact_match=target)
    jobs = [{"attention": a, "seed": s, "config": config} for s in range(seeds) for a in ATTENTION_KINDS]
    results = run_to_target(jobs, workers, progress)
    table = Table(f"Time to {target:.0%} validation caption exact match, preset {preset}, seeds 0-{seeds - 1} "
                  f"(training seconds; runs {workers or default_workers(len(jobs))} at a time, "
                  f"{TRAINING_THREADS} thread each)", ["attention"] + COLUMNS)
    for attention in ATTENTION_KINDS:
        table.add(attention, [attention] + _summary([r for r in results if r["attention"] == attention]))
    return table, results


def speedrun_log_table(seeds: int = 3, target: float = 0.95, attention: str = "sigma", workers: int | None = None,
                       progress: bool = True) -> tuple[Table, list[dict]]:
    """Each rung of LADDER trained to `target` for seeds 0..seeds-1 (SIGMA), all rungs in one run."""
    recipes = ladder_recipes()
    jobs = [{"attention": attention, "seed": s, "config": recipe.updated(target_exact_match=target, target_every=50),
             "rung": i}
            for s in range(seeds) for i, (_, recipe) in enumerate(recipes)]
    results = run_to_target(jobs, workers, progress)
    for job, result in zip(jobs, results):
        result["rung"] = job["rung"]
    table = Table(f"Speedrun log: {attention}, time to {target:.0%} validation caption exact match, seeds "
                  f"0-{seeds - 1} (training seconds; each change keeps the ones above it)", ["change"] + COLUMNS)
    for i, (change, _) in enumerate(recipes):
        table.add(i, [change] + _summary([r for r in results if r["rung"] == i]))
    return table, results


def _busy(seconds: float) -> None:
    """Keep one core busy (the other program of a shared machine)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def thread_table(preset: str = "cpu", repeats: int = 30, rounds: int = 3, progress: bool = True) -> Table:
    """Median training-step time with 1 and 2 torch threads, with the other core idle and then busy.

    The loads alternate for `rounds` rounds (idle, busy, idle, busy, ...), `repeats // rounds` steps per
    thread count each time, and every figure is the median over the rounds: on a shared machine a neighbour's
    load comes and goes, and one block per load would hand a slow minute to whichever load it fell on.
    """
    config = get_preset(preset)
    batch = DataStream(config.batch_size, 0, config.text_only_fraction).next()
    trainer = Trainer("sigma", config, 0, device="cpu")
    table = Table(f"Training step (SIGMA, preset {preset}) by torch threads, median ms; 'busy': another process "
                  "spins on one core", ["threads", "other core", "step ms", "ratio to 1 thread, idle"])
    measured = {(threads, load): [] for load in ("idle", "busy") for threads in (1, 2)}
    for load in tqdm([load for _ in range(rounds) for load in ("idle", "busy")], desc="threads", disable=not progress):
        spinner = None
        if load == "busy":
            spinner = multiprocessing.get_context("spawn").Process(target=_busy, args=(3600,), daemon=True)
            spinner.start()
        try:
            for threads in (1, 2):
                with torch_threads(threads):
                    step = lambda: trainer.train_step(batch)
                    median = interleaved_medians({"step": step}, max(1, repeats // rounds), warmup=3)["step"]
                    measured[threads, load].append(median)
        finally:
            if spinner is not None:
                spinner.terminate()
                spinner.join()
    seconds = {key: statistics.median(values) for key, values in measured.items()}
    for (threads, load), value in seconds.items():
        table.add([threads, load], [threads, load, value * 1e3, value / seconds[1, "idle"]])
    return table
