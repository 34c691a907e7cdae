"""The speedrun: how fast does each model LEARN the task? Time-to-accuracy, the recipe's log, and threads.

    python -m sigma_ref bench --time-to-accuracy --seeds 10 --first-seed 10   # every attention, seeds 10-19
    python -m sigma_ref bench --speedrun-log         # each recipe change against the one before it (SIGMA)
    python -m sigma_ref bench --threads              # a training step with 1 and 2 threads, other core idle/busy

Time-to-accuracy is the honest speed of a training recipe: a faster step that needs more steps is no faster.
A run trains with the recipe's own schedule, step budget and stopping rule: every `target_every` steps the
validation caption exact match (the recipe's `target_samples` scenes, greedy decoding) is checked, and the run
stops when `target_checks` checks in a row reach the target. The time to 95% is that rule with a 95% target,
replayed on the same run's checks (train.first_firing: the model at a check does not depend on when training
stops); the test caption exact match is read where the recipe itself stopped. Times are training time only (the
checks are the measurement, not the training). Runs go two at a time, one thread each, as `compare` trains
them (runtime.py's thread policy), so the times are what a learner's compare sees.

`check_curves` is the study behind the stopping rule: whole runs read every 25 steps on validation AND test, so
that any rule can be replayed and judged by the test accuracy where it would stop.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time

from tqdm.auto import tqdm

from .bench import Table, interleaved_medians
from ..data import DataStream
from .. import data as D
from ..evaluate import exact_match, teacher_forced_batches
from .experiments import ATTENTION_KINDS
from .runs import default_workers, run_in_workers
from ..runtime import TRAINING_THREADS, torch_threads
from ..attention import AttentionConfig
from ..model import ModelConfig
from ..train import TrainConfig, Trainer, first_firing, get_preset

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
    """One training with the job's recipe (and its stopping rule), in a worker process. Time to `measure` (95%) is
    the rule replayed with that target on the run's checks; the test metrics are the model's where training
    stopped."""
    with torch_threads(TRAINING_THREADS):
        trainer = Trainer(job["attention"], job["config"], job["seed"], device="cpu")
        trainer.run(progress=False)
        caption = exact_match(trainer.model, D.load_split("test")[:500])["exact_match"]
        compositional = exact_match(trainer.model, D.load_split("compositional"))["exact_match"]
    reached = first_firing(trainer.exact_match_curve, job["measure"], trainer.config.target_checks)
    return {"attention": job["attention"], "seed": job["seed"], "reached": reached is not None,
            "step": reached[0] if reached else trainer.step,
            "seconds": reached[1] if reached else trainer.train_seconds,
            "stopped_by_rule": trainer.target_reached is not None, "stopped_step": trainer.step,
            "stopped_seconds": trainer.train_seconds,
            "caption_exact_match": caption, "compositional_exact_match": compositional}


def run_to_target(jobs: list[dict], workers: int | None = None, progress: bool = True) -> list[dict]:
    """Train every job ({"attention", "seed", "config", "measure"}) to its recipe's stop, `workers` at a time.
    The job order interleaves what is compared, so slow and fast minutes of the machine land on all of them."""
    return run_in_workers(_time_to_target, jobs, workers, "time to target", progress)


def _summary(results: list[dict]) -> list:
    seconds = [r["seconds"] for r in results]
    caption = [r["caption_exact_match"] for r in results]
    return [statistics.median(seconds), min(seconds), max(seconds),
            f"{sum(r['reached'] for r in results)}/{len(results)}", statistics.median(r["step"] for r in results),
            statistics.median(r["stopped_seconds"] for r in results), max(r["stopped_seconds"] for r in results),
            min(caption), statistics.fmean(caption),
            statistics.fmean(r["compositional_exact_match"] for r in results)]


COLUMNS = ["median s to 95%", "min s", "max s", "reached", "median step", "median s to stop", "max s to stop",
           "test caption EM at stop: min", "mean", "compositional EM"]


def time_to_accuracy_table(preset: str = "cpu", seeds: int = 3, target: float = 0.95, workers: int | None = None,
                           progress: bool = True, first_seed: int = 0) -> tuple[Table, list[dict]]:
    """Each attention trained with the preset as it is (its stopping rule included), seeds first_seed ..
    first_seed + seeds - 1, side by side: the time to `target` validation caption exact match (the preset's rule
    with that target, replayed on the run's checks), the time to the preset's own stop, and the test caption exact
    match there."""
    config = get_preset(preset)
    chosen = range(first_seed, first_seed + seeds)
    jobs = [{"attention": a, "seed": s, "config": config, "measure": target} for s in chosen for a in ATTENTION_KINDS]
    results = run_to_target(jobs, workers, progress)
    table = Table(f"Time to {target:.0%} validation caption exact match ({config.target_checks} checks in a row, "
                  f"{config.target_samples} scenes), and to the preset's stop ({config.target_exact_match:.0%}), "
                  f"preset {preset}, seeds {chosen[0]}-{chosen[-1]} (training seconds; runs "
                  f"{workers or default_workers(len(jobs))} at a time, {TRAINING_THREADS} thread each)", ["attention"] + COLUMNS)
    for attention in ATTENTION_KINDS:
        table.add(attention, [attention] + _summary([r for r in results if r["attention"] == attention]))
    return table, results


def speedrun_log_table(seeds: int = 3, target: float = 0.95, attention: str = "sigma", workers: int | None = None,
                       progress: bool = True) -> tuple[Table, list[dict]]:
    """Each rung of LADDER trained to `target` for seeds 0..seeds-1 (SIGMA), all rungs in one run."""
    recipes = ladder_recipes()
    rule = {f: getattr(get_preset("cpu"), f) for f in ("target_every", "target_samples", "target_checks")}
    jobs = [{"attention": attention, "seed": s, "config": recipe.updated(target_exact_match=target, **rule),
             "measure": target, "rung": i}
            for s in range(seeds) for i, (_, recipe) in enumerate(recipes)]
    results = run_to_target(jobs, workers, progress)
    for job, result in zip(jobs, results):
        result["rung"] = job["rung"]
    table = Table(f"Speedrun log: {attention}, time to {target:.0%} validation caption exact match, seeds "
                  f"0-{seeds - 1} (training seconds; each change keeps the ones above it)", ["change"] + COLUMNS)
    for i, (change, _) in enumerate(recipes):
        table.add(i, [change] + _summary([r for r in results if r["rung"] == i]))
    return table, results


def _check_curve(job: dict) -> dict:
    """One training over the whole step budget, never stopped, read every `every` steps from `first`: training
    seconds, how many of the validation scenes [:200] and [200:] are captioned exactly, and the test split's
    exact match. Any stopping rule can then be replayed on the curve: the model at a step does not depend on
    when training would have stopped (evaluation draws nothing from the data stream)."""
    with torch_threads(TRAINING_THREADS):
        config = job["config"].updated(target_exact_match=None)
        trainer = Trainer(job["attention"], config, job["seed"], device="cpu")
        validation, test = D.load_split("validation"), D.load_split("test")
        parts = [(scenes, teacher_forced_batches(scenes)) for scenes in (validation[:200], validation[200:], test)]
        checks = []
        for step in range(job["first"], config.steps + 1, job["every"]):
            trainer.run(stop_at=step, progress=False)
            first, rest, on_test = (exact_match(trainer.model, scenes, batches=batches)["exact_match"]
                                    for scenes, batches in parts)
            checks.append({"step": step, "train_seconds": trainer.train_seconds,
                           "validation_200": first, "validation_300": (200 * first + 100 * rest) / 300,
                           "test": on_test})
    return {"attention": job["attention"], "seed": job["seed"], "checks": checks}


def check_curves(seeds, preset: str = "cpu", every: int = 25, first: int = 100, workers: int | None = None,
                 progress: bool = True) -> list[dict]:
    """_check_curve for every attention and seed, `workers` at a time (interleaved by seed)."""
    config = get_preset(preset)
    jobs = [{"attention": a, "seed": s, "config": config, "every": every, "first": first}
            for s in seeds for a in ATTENTION_KINDS]
    return run_in_workers(_check_curve, jobs, workers, "check curves", progress)


# Stopping rules the study compares: (target, validation scenes, check every, checks in a row). The first is the
# rule the `cpu` preset had before the study; the `cpu` preset's rule now is among them (tests check that).
STOPPING_RULES = [(0.98, 200, 50, 1), (0.98, 300, 50, 1), (0.98, 200, 25, 1), (0.99, 300, 25, 1),
                  (0.98, 200, 50, 2), (0.98, 200, 25, 2), (0.97, 300, 25, 2), (0.98, 300, 25, 2), (0.98, 300, 25, 3)]


def replay_rule(curve: dict, target: float, scenes: int, every: int, checks: int) -> tuple[dict, bool]:
    """(the check where the rule stops training, whether the rule fired) on one check curve; without firing,
    training ends at the last check (the step budget)."""
    kept = [(c["step"], c["train_seconds"], c[f"validation_{scenes}"]) for c in curve["checks"] if c["step"] % every == 0]
    fired = first_firing(kept, target, checks)
    stop = fired[0] if fired else curve["checks"][-1]["step"]
    return next(c for c in curve["checks"] if c["step"] == stop), fired is not None


def stopping_rule_table(curves: list[dict], rules=STOPPING_RULES) -> Table:
    """Each rule replayed on every curve: how often it fired, the test caption exact match where it stopped (the
    lowest, and how many runs fell below 95%), and the steps it took."""
    seeds = sorted({c["seed"] for c in curves})
    table = Table(f"Stopping rules replayed on {len(curves)} runs (every attention, seeds {seeds[0]}-{seeds[-1]}, "
                  f"whole step budget, checks every 25 steps): test caption exact match where each rule stops",
                  ["target", "validation scenes", "check every", "checks in a row", "fired", "lowest test EM",
                   "runs below 95%", "median step", "max step"])
    for rule in rules:
        stops = [replay_rule(curve, *rule) for curve in curves]
        tests, steps = [c["test"] for c, _ in stops], [c["step"] for c, _ in stops]
        table.add(list(rule), [*rule, f"{sum(fired for _, fired in stops)}/{len(stops)}", min(tests),
                               sum(t < 0.95 for t in tests), statistics.median(steps), max(steps)])
    return table


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
