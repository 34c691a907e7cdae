"""Training runs: one model trained and evaluated into its directory, and many jobs in worker processes.

    train_and_evaluate(attention, preset, seed, out_dir)   one model: train, evaluate, write metrics.json
    run_in_workers(function, jobs)                         jobs in spawned processes, one thread each on a CPU

`experiments` builds on this (which runs to train, reuse, compare, draw); the lab's other experiments use
run_in_workers for their own jobs. The training workers import this module and nothing that draws: a worker
that imported matplotlib with `experiments` spent about a second more starting, for every compare and notebook.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checks import check_int
from ..evaluate import evaluate_all
from ..runtime import TRAINING_THREADS, idle_cores, torch_threads, write_atomic
from ..train import TrainConfig, Trainer, get_preset


def run_dir(out_dir: str | Path, attention: str, seed: int) -> Path:
    return Path(out_dir) / f"{attention}_seed{seed}"


def train_and_evaluate(attention: str, preset: str, seed: int, out_dir: str | Path, backend: str = "auto",
                       resume: bool = False, progress: bool = True, device=None,
                       config: TrainConfig | None = None, model_overrides: dict | None = None) -> dict:
    """Train one model, evaluate it, write out_dir/metrics.json (and the checkpoint); return the metrics.

    The recipe is the preset's (with `backend`), or `config` when given (the preset is then only its name).
    `model_overrides` are ModelConfig or AttentionConfig fields (SIGMA's ablation switches num_intra_heads,
    bias_init, use_gates, use_stream_bias; Gated Attention's headwise_gate; ...), recorded in metrics["config"]. resume=True continues from out_dir/checkpoint.pt when there is one (same recipe, or ValueError).
    """
    config = config or get_preset(preset).updated(backend=backend)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(attention, config, seed, out_dir, device=device, model_overrides=model_overrides)
    if resume and trainer.checkpoint_path.exists():
        trainer.load(trainer.checkpoint_path)
    trainer.run(progress=progress)
    metrics = {"attention": attention, "preset": preset, "seed": seed, "steps": trainer.step,
               "parameters": trainer.model.num_parameters(), "train_seconds": trainer.train_seconds,
               "target_reached": trainer.target_reached, "threads": torch.get_num_threads(),
               "device": str(trainer.device) if trainer.device.type == "cpu" else torch.cuda.get_device_name(),
               "config": trainer.config.as_dict(),
               **evaluate_all(trainer.model, config.eval_samples),
               "loss_curve": trainer.loss_curve, "validation_curve": trainer.validation_curve,
               "exact_match_curve": trainer.exact_match_curve, "gate_history": trainer.gate_history}
    text = json.dumps(metrics, indent=1)
    write_atomic(out_dir / "metrics.json", text)
    return json.loads(text)            # as a later reader sees it (lists, string keys), trained now or reused


def read_metrics(path: Path) -> dict | None:
    """metrics.json, or None when it is missing or unreadable (an interrupted write of an older version)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def train_job(job: dict) -> dict:
    """One training in a worker process (module level, so that a spawned process can import it)."""
    with torch_threads(TRAINING_THREADS):
        return train_and_evaluate(**job)


def default_workers(jobs: int) -> int:
    """Processes that train side by side: one per core that other programs leave idle on a CPU (one thread
    each), one on a GPU."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(jobs, idle_cores() // TRAINING_THREADS))


def run_in_workers(function, jobs: list, workers: int | None = None, desc: str = "runs", progress: bool = True) -> list:
    """[function(job) for job in jobs], `workers` processes at a time (default: default_workers), results in job
    order. Each worker is a fresh ("spawn") interpreter, safe under Jupyter and with torch's thread pools, so
    `function` must be a module-level function. One worker (or one job) runs in this process instead."""
    workers = default_workers(len(jobs)) if workers is None else workers
    check_int("workers", workers, low=1)
    if workers == 1 or len(jobs) <= 1:
        return [function(job) for job in tqdm(jobs, desc=desc, disable=not progress or len(jobs) <= 1)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(function, jobs), total=len(jobs), desc=f"{desc}, {workers} at a time",
                         disable=not progress))
