"""Train and evaluate the tiny MLLM: one trainer for all three attentions, so the comparison is fair.

    python -m sigma_ref train --attention sigma --preset cpu --seed 0 --out runs/sigma0
    python -m sigma_ref compare --preset cpu --seeds 3 --out runs/compare

Every model gets the same data stream (per seed), the same optimiser, schedule and step budget; nothing is
tuned for one attention and not the others. Training is deterministic: same seed, same machine, same loss
curve. Checkpoints are written atomically (a temporary file, then a rename), and `--resume` continues the
same curve because the checkpoint holds the data stream's position and every random state.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import data as D
from .data import DataStream
from .model import ModelConfig, TinyMLLM
from .runtime import default_device


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe. Presets below; `fast_mode()` does not change them (notebooks pick `ci`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    steps: int
    batch_size: int
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    text_only_fraction: float = 0.25
    eval_every: int = 100
    eval_samples: int = 500            # per split, at the end
    checkpoint_every: int = 200
    bf16: bool = False                 # autocast to bfloat16 (CUDA only)
    backend: str = "auto"


PRESETS = {
    # Trains in well under a minute on 2 CPU cores; used by the tests and by the notebooks in fast mode.
    "ci": TrainConfig(hidden_size=64, num_layers=2, num_heads=4, steps=500, batch_size=32, warmup_steps=30,
                      eval_every=50, eval_samples=100, checkpoint_every=250),
    # Each model in at most 5 minutes on 2 CPU cores.
    "cpu": TrainConfig(hidden_size=96, num_layers=3, num_heads=4, steps=3000, batch_size=48, eval_every=250,
                       checkpoint_every=500),
    # A CUDA GPU: larger, bf16, flash-attn when installed.
    "gpu": TrainConfig(hidden_size=256, num_layers=6, num_heads=8, steps=4000, batch_size=128, lr=1e-3,
                       warmup_steps=200, eval_every=500, checkpoint_every=1000, bf16=True),
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]


def model_config(attention: str, train: TrainConfig, **overrides) -> ModelConfig:
    return ModelConfig(attention=attention, hidden_size=train.hidden_size, num_layers=train.num_layers,
                       num_heads=train.num_heads, backend=train.backend, **overrides)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 10% of it."""
    if step < config.warmup_steps:
        return config.lr * ((step + 1) / config.warmup_steps)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))      # 1 -> 0
    return config.lr * (1 - 0.9 * (1 - cosine))


def load_model(checkpoint: str | Path, device="cpu") -> TinyMLLM:
    """A trained TinyMLLM from a checkpoint written by the trainer, in eval mode."""
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    config = ModelConfig(**{**state["model_config"], "bias_init": tuple(map(tuple, state["model_config"]["bias_init"]))})
    model = TinyMLLM(config).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class Trainer:
    """Holds the model, optimiser and data stream; `run()` trains to `config.steps`."""

    def __init__(self, attention: str, config: TrainConfig, seed: int, out_dir: str | Path | None = None,
                 device=None, model_overrides: dict | None = None):
        self.attention, self.config, self.seed = attention, config, seed
        self.device = torch.device(device) if device else default_device()
        self.out_dir = Path(out_dir) if out_dir else None
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        self.model = TinyMLLM(model_config(attention, config, **(model_overrides or {}))).to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "stream_bias" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2 or "stream_bias" in n]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
        self.stream = DataStream(config.batch_size, seed, config.text_only_fraction)
        self.step = 0
        self.loss_curve: list[tuple[int, float]] = []
        self.gate_history: list[dict] = []
        self.validation_curve: list[tuple[int, float]] = []
        self.train_seconds = 0.0

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "loss_curve": self.loss_curve, "gate_history": self.gate_history,
                "validation_curve": self.validation_curve, "train_seconds": self.train_seconds,
                "data_rng": self.stream.rng.getstate(),
                "torch_rng": torch.get_rng_state(), "attention": self.attention, "config": asdict(self.config),
                "model_config": asdict(self.model.config), "seed": self.seed}

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["attention"] != self.attention or state["seed"] != self.seed:
            raise ValueError(f"checkpoint {path} is for attention={state['attention']!r} seed={state['seed']}, "
                             f"not attention={self.attention!r} seed={self.seed}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.loss_curve = state["step"], [tuple(x) for x in state["loss_curve"]]
        self.gate_history, self.train_seconds = state["gate_history"], state["train_seconds"]
        self.validation_curve = [tuple(x) for x in state["validation_curve"]]
        self.stream.rng.setstate(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])

    def train_step(self, batch: dict) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.config)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.config.bf16 and self.device.type == "cuda")
        with autocast:
            loss = self.model(batch).loss
        if not torch.isfinite(loss):
            last = f"the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path and \
                self.checkpoint_path.exists() else "no checkpoint was written yet"
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.step}; stopping; {last}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def run(self, stop_at: int | None = None, progress: bool = True) -> None:
        """Train until step `stop_at` (default: config.steps). Every `eval_every` steps: the validation loss and
        the mean gates on a fixed validation batch; every `checkpoint_every` steps: a checkpoint."""
        from tqdm.auto import tqdm

        from .probes import gate_means

        stop_at = self.config.steps if stop_at is None else stop_at
        probe_batch = to_device(D.collate([D.encode(s) for s in D.load_split("validation")[:32]]), self.device)
        bar = tqdm(total=stop_at, initial=self.step, desc=f"{self.attention} seed {self.seed}", disable=not progress)
        while self.step < stop_at:
            start = time.perf_counter()
            self.model.train()
            loss = self.train_step(to_device(self.stream.next(), self.device))
            self.train_seconds += time.perf_counter() - start
            self.loss_curve.append((self.step, loss))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                self.model.eval()
                with torch.no_grad():
                    self.validation_curve.append((self.step, self.model(probe_batch).loss.item()))
                self.gate_history.append({"step": self.step, "gates": gate_means(self.model, probe_batch)})
            if self.checkpoint_path and (self.step % self.config.checkpoint_every == 0 or self.step == stop_at):
                save_checkpoint(self.checkpoint_path, self.state())
        bar.close()


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def prompt_of(example: D.Example) -> D.Example:
    """The example cut after <answer>: what the model sees before it writes the caption."""
    n = example.answer_start
    return D.Example(example.tokens[:n], example.modality[:n], example.patch_index[:n], example.patches, n,
                     example.caption)


@torch.no_grad()
def evaluate(model: TinyMLLM, scenes: list[dict], inserted: int = 0, kind: str = "blank",
             batch_size: int = 128) -> dict:
    """Greedy captions for `scenes`: exact match, per-slot accuracy, and the mean caption loss."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    examples = [D.encode(s, inserted, kind, generator) for s in scenes]
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_length.setdefault(e.answer_start, []).append(i)
    predictions: list[list[str] | None] = [None] * len(examples)
    losses = []
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            prompts = to_device(D.collate([prompt_of(examples[i]) for i in chunk]), device)
            for i, ids in zip(chunk, model.generate(prompts, max_new_tokens=16)):
                predictions[i] = [D.VOCAB[t] for t in ids]
            losses.append(model(to_device(D.collate([examples[i] for i in chunk]), device)).loss.item() * len(chunk))
    exact = [p == e.caption for p, e in zip(predictions, examples)]
    slots = {}
    for p, e in zip(predictions, examples):
        truth, guess = D.caption_slots(e.caption), D.caption_slots(p)
        for slot, value in truth.items():
            if value is not None:
                slots.setdefault(slot, []).append(guess[slot] == value)
    return {"exact_match": sum(exact) / len(exact),
            "slot_accuracy": {slot: sum(v) / len(v) for slot, v in slots.items()},
            "loss": sum(losses) / len(examples),
            "examples": [{"reference": " ".join(e.caption), "generated": " ".join(p)}
                         for p, e in list(zip(predictions, examples))[:8]]}


def evaluate_all(model: TinyMLLM, samples: int) -> dict:
    """Every metric of metrics.json that comes from the model (not from the training run)."""
    from .probes import dilution as measure_dilution

    test = evaluate(model, D.load_split("test")[:samples])
    dilution = measure_dilution(model, D.load_split("text_only")[:samples])
    return {
        "caption_exact_match": test["exact_match"],
        "slot_accuracy": test["slot_accuracy"],
        "test_loss": test["loss"],
        "compositional_exact_match": evaluate(model, D.load_split("compositional")[:samples])["exact_match"],
        "text_only_accuracy": dilution["blank"][0]["accuracy"],
        "dilution": {kind: {str(n): r["accuracy"] for n, r in rows.items()} for kind, rows in dilution.items()},
        "dilution_loss": {kind: {str(n): r["loss"] for n, r in rows.items()} for kind, rows in dilution.items()},
        "samples": test["examples"],
    }


def train_and_evaluate(attention: str, preset: str, seed: int, out_dir: str | Path, backend: str = "auto",
                       resume: bool = False, progress: bool = True, device=None) -> dict:
    """Train one model, evaluate it, write out_dir/metrics.json (and the checkpoint); return the metrics."""
    config = replace(get_preset(preset), backend=backend)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(attention, config, seed, out_dir, device=device)
    if resume and trainer.checkpoint_path.exists():
        trainer.load(trainer.checkpoint_path)
    trainer.run(progress=progress)
    metrics = {"attention": attention, "preset": preset, "seed": seed, "steps": trainer.step,
               "parameters": trainer.model.num_parameters(), "train_seconds": trainer.train_seconds,
               "device": str(trainer.device) if trainer.device.type == "cpu" else torch.cuda.get_device_name(),
               **evaluate_all(trainer.model, config.eval_samples),
               "loss_curve": trainer.loss_curve, "validation_curve": trainer.validation_curve,
               "gate_history": trainer.gate_history, "checkpoint": str(trainer.checkpoint_path)}       # as written; readers use run_dir()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


# ---------------------------------------------------------------------------------------------------
# Comparing the three attentions over seeds
# ---------------------------------------------------------------------------------------------------

TABLE_METRICS = [("caption_exact_match", "caption EM"), ("compositional_exact_match", "compositional EM"),
                 ("text_only_accuracy", "text-only acc"), ("dilution.blank.64", "text-only, 64 blank img"),
                 ("dilution.noise.64", "text-only, 64 noise img"), ("test_loss", "test loss"),
                 ("train_seconds", "train s"), ("parameters", "params")]


def metric(metrics: dict, dotted: str):
    for key in dotted.split("."):
        metrics = metrics[key]
    return metrics


def summary_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: one row per attention, mean ± standard deviation over seeds for each metric."""
    header = "| attention | " + " | ".join(label for _, label in TABLE_METRICS) + " |"
    lines = [header, "|---" * (len(TABLE_METRICS) + 1) + "|"]
    for attention, results in runs.items():
        cells = []
        for key, _ in TABLE_METRICS:
            values = [metric(r, key) for r in results]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{mean:.0f}" if key == "parameters" else f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ATTENTION_KINDS = ("standard", "gated", "sigma")


def run_dir(out_dir: str | Path, attention: str, seed: int) -> Path:
    return Path(out_dir) / f"{attention}_seed{seed}"


def ensure_trained(preset: str, seeds, out_dir: str | Path, attentions=ATTENTION_KINDS, backend: str = "auto",
                   progress: bool = True) -> dict[str, list[dict]]:
    """Metrics of every (attention, seed) in out_dir, training only those not there yet (or of another preset).

    Notebooks and `compare` share this, so a model trained once is reused: `python -m sigma_ref compare
    --preset cpu --out runs/cpu` before opening the notebooks saves them the training time.
    """
    runs = {}
    for attention in attentions:
        for seed in seeds:
            path = run_dir(out_dir, attention, seed)
            metrics_path = path / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
            if metrics is None or metrics.get("preset") != preset:
                metrics = train_and_evaluate(attention, preset, seed, path, backend, progress=progress)
            runs.setdefault(attention, []).append(metrics)
    return runs


def compare(preset: str, seeds: int, out_dir: str | Path, attentions=ATTENTION_KINDS,
            backend: str = "auto", progress: bool = True) -> dict:
    """Train every attention for seeds 0..seeds-1; write results.json, results.md and the figures."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out_dir = Path(out_dir)
    runs = ensure_trained(preset, range(seeds), out_dir, attentions, backend, progress)
    from .bench import machine_description
    machine = machine_description()
    table = summary_table(runs)
    (out_dir / "results.json").write_text(json.dumps({"preset": preset, "seeds": list(range(seeds)),
                                                      "machine": machine, "runs": runs}, indent=1))
    (out_dir / "results.md").write_text(
        f"Preset `{preset}`, seeds {list(range(seeds))}, mean ± std over seeds; machine: {machine}\n\n{table}\n")
    print(table)
    from .viz import write_compare_figures
    write_compare_figures(runs, out_dir)
    return runs


def training_step_table(progress: bool = True, preset: str = "cpu", repeats: int = 50):
    """Median training-step time of the tiny model for each attention (auto backend), ratio to standard."""
    from tqdm.auto import tqdm

    from .bench import Table, interleaved_medians

    config = get_preset(preset)
    table = Table(f"Tiny-model training step, preset {preset} (D={config.hidden_size}, L={config.num_layers}, "
                  f"H={config.num_heads}, batch {config.batch_size}), median ms, timed round-robin",
                  ["attention", "step ms", "ratio"])
    batch = DataStream(config.batch_size, 0, config.text_only_fraction).next()
    steps = {}
    for attention in tqdm(ATTENTION_KINDS, desc="train step", disable=not progress):
        trainer = Trainer(attention, config, 0, device="cpu")
        steps[attention] = lambda trainer=trainer: trainer.train_step(batch)
    seconds = interleaved_medians(steps, repeats, warmup=3)
    for attention, t in seconds.items():
        table.rows.append([attention, t * 1e3, t / seconds["standard"]])
    return table
