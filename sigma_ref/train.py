"""Train the tiny MLLM: one recipe and one trainer for all three attentions, so the comparison is fair.

    python -m sigma_ref train --attention sigma --preset cpu --seed 0 --out runs/sigma0

This module holds the recipe (TrainConfig and its presets), the Trainer and its checkpoints. Evaluation is
in evaluate.py; running many trainings and comparing them is in experiments.py.

Every model gets the same data stream (per seed), the same optimiser, schedule and step budget; nothing is
tuned for one attention and not the others. Training is deterministic: same seed, same machine, same loss
curve. Checkpoints are written atomically (a temporary file, then a rename), and `--resume` continues the
same curve because the checkpoint holds the data stream's position and every random state.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as D
from .data import DataStream
from .evaluate import to_device
from .model import ModelConfig, TinyMLLM
from .probes import gate_means
from .runtime import default_device, write_atomic


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
    """The model a recipe trains on the toy set: its sizes from `train`, its vocabulary from data.py."""
    return ModelConfig(attention=attention, hidden_size=train.hidden_size, num_layers=train.num_layers,
                       num_heads=train.num_heads, backend=train.backend, **D.model_fields(), **overrides)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 10% of it."""
    if step < config.warmup_steps:
        return config.lr * ((step + 1) / config.warmup_steps)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))      # 1 -> 0
    return config.lr * (1 - 0.9 * (1 - cosine))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    write_atomic(path, lambda f: torch.save(state, f))


def checkpoint_config(path: Path) -> dict:
    """The TrainConfig (as a dict) a checkpoint was written with."""
    return torch.load(path, map_location="cpu", weights_only=False)["config"]


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
        """Continue from a checkpoint of the SAME run (attention, seed and recipe), on any device."""
        state = torch.load(path, map_location="cpu", weights_only=False)    # RNG states must stay on the CPU
        if state["attention"] != self.attention or state["seed"] != self.seed:
            raise ValueError(f"checkpoint {path} is for attention={state['attention']!r} seed={state['seed']}, "
                             f"not attention={self.attention!r} seed={self.seed}")
        differing = {k: (v, state["config"].get(k)) for k, v in asdict(self.config).items() if state["config"].get(k) != v}
        if differing:
            raise ValueError(f"checkpoint {path} was trained with another recipe; (asked, in checkpoint): {differing}. "
                             "Resume with the same TrainConfig, or start a fresh run in another directory")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])           # moves its state to the parameters' device
        self.step, self.loss_curve = state["step"], [tuple(x) for x in state["loss_curve"]]
        self.gate_history, self.train_seconds = state["gate_history"], state["train_seconds"]
        self.validation_curve = [tuple(x) for x in state["validation_curve"]]
        self.stream.rng.setstate(state["data_rng"])
        torch.set_rng_state(state["torch_rng"].cpu())

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


