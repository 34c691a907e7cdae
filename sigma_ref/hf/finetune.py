"""Train a tiny LLaVA on the toy captions with transformers' own Trainer: the route to more GPUs and machines.

    python -m sigma_ref.hf.finetune --attention sigma --steps 600 --out runs/hf_sigma
    torchrun --nproc_per_node 2 -m sigma_ref.hf.finetune --attention sigma --batch-size 16 ...   (two processes)

One process or several run the same script: under torchrun, Trainer wraps the model in DistributedDataParallel
(gloo on CPU, nccl on GPUs) and gives each process its share of every global batch, so `--batch-size` is the
GLOBAL batch and the per-process batch is batch-size / world size. The run writes `log.json` (the loss at every
step, from process 0) and, with `--save`, the model (save_pretrained; reload with sigma_ref.hf.from_pretrained).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..checks import check_choice, check_int
from ..runtime import TRAINING_THREADS, torch_threads
from . import toy
from .convert import sigmafy

ATTENTIONS = ("standard", "sigma")


class LossLog(TrainerCallback):
    """The training loss at every logged step and, every `eval_every` steps, validation caption exact match
    (on `eval_size` captions, process 0 only); "seconds" counts training time, evaluations excluded."""

    def __init__(self, eval_every: int = 0, eval_size: int = 100):
        self.rows, self.checks, self.eval_every, self.eval_size = [], [], eval_every, eval_size
        self.start, self.evaluating = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start - self.evaluating, 2)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, "loss": logs["loss"], "seconds": self.seconds()})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_every and state.global_step % self.eval_every == 0 and state.is_world_process_zero:
            began, seconds = time.perf_counter(), self.seconds()
            accuracy = toy.caption_exact_match(model, "validation", limit=self.eval_size)
            self.checks.append({"step": state.global_step, "seconds": seconds, "validation_caption_em": accuracy})
            self.evaluating += time.perf_counter() - began


def build(attention: str, seed: int = 0, sigma_options: dict | None = None, **model_options):
    """A tiny LLaVA (toy.tiny_llava), converted to SIGMA (with `sigma_options` for sigmafy) when
    attention == "sigma"."""
    check_choice("attention", attention, ATTENTIONS)
    model = toy.tiny_llava(seed=seed, **model_options)
    return sigmafy(model, **(sigma_options or {})) if attention == "sigma" else model


def finetune(model, out_dir, steps: int = 600, batch_size: int = 16, learning_rate: float = 3e-3, seed: int = 0,
             train_size: int = 20_000, log_every: int = 1, eval_every: int = 0) -> tuple[Trainer, LossLog]:
    """Train `model` with transformers.Trainer for `steps` steps of `batch_size` (global) toy captions."""
    check_int("steps", steps, low=1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise ValueError(f"batch_size must be divisible by the number of processes ({world}), got {batch_size}")
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size // world,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=min(50, steps // 10),
        weight_decay=0.0, logging_steps=log_every, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=int(os.environ.get("RANK", "0")) != 0,
        ddp_backend=None if torch.cuda.is_available() else ("gloo" if world > 1 else None))
    log = LossLog(eval_every)
    trainer = Trainer(model=model, args=args, train_dataset=toy.ToyCaptions(size=train_size, seed=seed),
                      data_collator=toy.collate, callbacks=[log])
    # On a CPU, one thread per training process, the package's thread policy (runtime.py): torch's default
    # threads collapse when another program holds a core (a notebook's 300 steps went from 26 s to over 300 s).
    with torch_threads(torch.get_num_threads() if torch.cuda.is_available() else TRAINING_THREADS):
        trainer.train()
    return trainer, log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", choices=ATTENTIONS, default="sigma")
    parser.add_argument("--num-intra-heads", type=int, default=None, help="sigma: intra heads (default: half)")
    parser.add_argument("--no-gates", action="store_true", help="sigma: the split without gates (an ablation)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", action="store_true", help="save_pretrained the trained model into --out")
    parser.add_argument("--evaluate", type=int, default=0, help="test captions to score at the end (0: none)")
    parser.add_argument("--eval-every", type=int, default=0, help="score 100 validation captions every N steps")
    parser.add_argument("--log-every", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    options = {"num_intra_heads": args.num_intra_heads, "use_gates": not args.no_gates}
    model = build(args.attention, seed=args.seed, sigma_options=options)
    trainer, log = finetune(model, args.out, args.steps, args.batch_size, args.learning_rate, args.seed,
                            log_every=args.log_every, eval_every=args.eval_every)
    if trainer.is_world_process_zero():
        result = {"attention": args.attention, "steps": args.steps, "batch_size": args.batch_size,
                  "sigma": getattr(trainer.model.config, "sigma", None),
                  "learning_rate": args.learning_rate, "seed": args.seed,
                  "processes": int(os.environ.get("WORLD_SIZE", "1")), "train_seconds": log.seconds(),
                  "log": log.rows, "validation_checks": log.checks}
        if args.evaluate:
            result["test_caption_exact_match"] = toy.caption_exact_match(trainer.model, limit=args.evaluate)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "log.json").write_text(json.dumps(result, indent=1) + "\n")
        if args.save:
            trainer.model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
