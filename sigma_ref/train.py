"""Train the tiny MLLM: one recipe and one trainer for every attention, so the comparison is fair.

    python -m sigma_ref train --attention sigma --preset cpu --seed 0 --out runs/sigma0

This module holds the recipe (TrainConfig and its presets), the Trainer and its checkpoints. Evaluation is
in evaluate.py; running many trainings and comparing them is in experiments.py.

Every model gets the same data stream (per seed), the same optimiser, schedule and step budget; nothing is
tuned for one attention and not the others. Training is deterministic: same seed, same machine, same loss
curve. Checkpoints are written atomically (a temporary file, then a rename), and `--resume` continues the
same curve because the checkpoint holds the data stream's position (the only random state training uses).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as D
from .attention import AttentionConfig
from .checks import check_choice, check_int
from .data import DataStream
from .evaluate import exact_match, teacher_forced_batches, to_device
from .model import ModelConfig, TinyMLLM
from .optim import Muon
from .probes import gate_means
from .runtime import default_device, write_atomic


OPTIMIZERS = ("adamw", "muon")
# Which weight matrices Muon trains (by module name), when the recipe's optimizer is "muon".
MUON_SCOPES = {"blocks": ("blocks.",), "blocks+patch": ("blocks.", "patch_embedding.")}
GATE_PROBE_IMAGES = 16                 # blank image tokens in the text-only gate probe recorded during training


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe: the model it trains (a ModelConfig) and how. Presets below; fast mode never changes
    a recipe (it trains fewer seeds).

    A recipe is shared by every attention of a comparison: `Trainer(attention, recipe, seed)` trains
    `recipe.updated(attention=attention)`, and a checkpoint records that whole config, model included.
    `recipe.updated(steps=300, num_layers=3, use_gates=False)` changes fields of any level by name.
    """

    model: ModelConfig
    steps: int
    batch_size: int
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    text_only_fraction: float = 0.25
    max_irrelevant_images: int = 0     # text-only samples carry 0..k blank / noise image tokens (data.DataStream)
    eval_every: int = 100
    eval_samples: int = 500            # per split, at the end
    checkpoint_every: int = 200
    optimizer: str = "adamw"           # "adamw", or "muon": Muon for the blocks' weight matrices, AdamW for the rest
    muon_scope: str = "blocks"         # "blocks", or "blocks+patch": Muon also trains the patch projection
    muon_momentum: float = 0.95
    # Stop early once the validation caption exact match reaches this (None: train all `steps`). Checked every
    # `target_every` steps on the first `target_samples` validation scenes (greedy exact match, read in one
    # teacher-forced pass: evaluate.exact_match); training stops
    # when `target_checks` checks in a row are at or above the target (one check alone can be a lucky draw).
    target_exact_match: float | None = None
    target_every: int = 100
    target_samples: int = 200
    target_checks: int = 1

    def __post_init__(self):
        if isinstance(self.model, dict):                               # read back from a checkpoint or JSON
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"TrainConfig.model must be a ModelConfig, got {type(self.model).__name__}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "target_every", "target_samples",
                     "target_checks"):
            check_int(f"TrainConfig.{name}", getattr(self, name), low=1)
        check_choice("TrainConfig.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("TrainConfig.muon_scope", self.muon_scope, MUON_SCOPES)
        if isinstance(self.muon_momentum, bool) or not isinstance(self.muon_momentum, (int, float)) \
                or not 0 <= self.muon_momentum < 1:
            raise ValueError(f"TrainConfig.muon_momentum must be a number in [0, 1), got {self.muon_momentum!r}")
        if self.target_exact_match is not None and not 0 <= self.target_exact_match <= 1:
            raise ValueError(f"TrainConfig.target_exact_match must be None or between 0 and 1, "
                             f"got {self.target_exact_match!r}")

    def updated(self, **changes) -> TrainConfig:
        """A copy with `changes` applied, each to the level that declares it: this recipe, its model, or the
        model's attention (ModelConfig.updated)."""
        own = {name: changes.pop(name) for name in list(changes) if name in TRAIN_FIELDS}
        model = self.model.updated(**changes) if changes else own.pop("model", self.model)
        return replace(self, model=model, **own)

    def as_dict(self) -> dict:
        """The recipe as JSON holds it (tuples as lists): what checkpoints and metrics.json record and compare."""
        return json.loads(json.dumps(asdict(self)))


TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))

PRESETS = {
    # The course's model on a CPU: learns the task (>= 95% caption exact match) in less than a minute of one
    # core's time. The speedrun log in docs/PERFORMANCE.md (lab/speedrun.py's LADDER) says how it was reached.
    "cpu": TrainConfig(ModelConfig(attn=AttentionConfig(hidden_size=64, num_heads=4), num_layers=2, mlp_ratio=1,
                                   patch_encoder="conv", **D.model_fields()),
                       steps=600, batch_size=48, lr=1e-2, warmup_steps=20, optimizer="muon", muon_scope="blocks+patch",
                       muon_momentum=0.9, text_only_fraction=0.1, eval_every=100, checkpoint_every=200,
                       # The stopping rule: 98% on all 300 validation scenes at two checks in a row, 25 steps
                       # apart. One check on 200 scenes stopped on lucky draws (docs/PERFORMANCE.md has the study).
                       target_exact_match=0.98, target_every=25, target_samples=300, target_checks=2),
    # A CUDA GPU: larger, bf16, flash-attn (or torch's varlen flash kernel) when present.
    "gpu": TrainConfig(ModelConfig(attn=AttentionConfig(hidden_size=256, num_heads=8), num_layers=6,
                                   precision="bfloat16", **D.model_fields()),
                       steps=4000, batch_size=128, lr=1e-3, warmup_steps=200, eval_every=500, checkpoint_every=1000),
}


def get_preset(name: str) -> TrainConfig:
    """A copy of the named recipe (its ModelConfig is the caller's to change)."""
    return copy.deepcopy(PRESETS[check_choice("preset", name, PRESETS)])


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 10% of it."""
    if step < config.warmup_steps:
        return config.lr * ((step + 1) / config.warmup_steps)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))      # 1 -> 0
    return config.lr * (1 - 0.9 * (1 - cosine))


def make_optimizers(model: torch.nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimisers of a recipe, each with its own parameter groups; all step with the same schedule.

    adamw: AdamW for everything; weight decay on weight matrices only (not on norms, biases, the stream bias).
    muon:  Muon (orthogonalised momentum, optim.py) for the weight matrices inside the blocks (and, with
           muon_scope "blocks+patch", the patch projection: the image's way in, a matrix between features like
           the blocks'), where it trains in fewer steps than AdamW; AdamW for embeddings, the (tied) output
           head, the conv filters, norms, biases and the stream bias, as in the Muon recipes of the GPT-2
           speedruns. Muon's update is scaled to AdamW's size, so both take the same `lr`.
    """
    named = list(model.named_parameters())
    # Muon orthogonalises 2-D updates; a weight matrix between hidden features is the kind of parameter it was
    # made for (the blocks', and with muon_scope "blocks+patch" the patch projection's).
    owners = MUON_SCOPES[config.muon_scope]
    use_muon = lambda name, p: config.optimizer == "muon" and p.dim() == 2 and name.startswith(owners)
    muon = [p for n, p in named if use_muon(n, p)]
    decay = [p for n, p in named if not use_muon(n, p) and p.dim() >= 2 and "stream_bias" not in n]
    no_decay = [p for n, p in named if not use_muon(n, p) and (p.dim() < 2 or "stream_bias" in n)]
    # fused: one kernel for all of AdamW's parameters instead of a loop of small ops per parameter (CPU and CUDA)
    optimizers = [torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=True)]
    if muon:
        optimizers.append(Muon(muon, lr=config.lr, weight_decay=config.weight_decay, momentum=config.muon_momentum))
    return optimizers


def rule_fires(curve: list[tuple[int, float, float]], target: float, checks: int) -> bool:
    """The stopping rule on a curve of checks (step, seconds, exact match): the last `checks` are all >= target."""
    last = [exact_match for _, _, exact_match in curve[-checks:]]
    return len(last) == checks and min(last) >= target


def first_firing(curve: list[tuple[int, float, float]], target: float, checks: int) -> tuple[int, float] | None:
    """(step, training seconds) of the first check at which the rule fires on this curve, or None. The model at a
    check does not depend on when training stops, so a curve replays any rule exactly."""
    for end in range(1, len(curve) + 1):
        if rule_fires(curve[:end], target, checks):
            return curve[end - 1][0], curve[end - 1][1]
    return None


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
        self.attention, self.seed = attention, seed
        self.config = config.updated(attention=attention, **(model_overrides or {}))   # the whole run, model included
        self.device = torch.device(device) if device else default_device()
        self.out_dir = Path(out_dir) if out_dir else None
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        self.model = TinyMLLM(self.config.model).to(self.device)
        self.optimizers = make_optimizers(self.model, self.config)
        self.stream = DataStream(config.batch_size, seed, config.text_only_fraction, config.max_irrelevant_images)
        self.step = 0
        self.loss_curve: list[tuple[int, float]] = []
        self.gate_history: list[dict] = []
        self.validation_curve: list[tuple[int, float]] = []
        self.exact_match_curve: list[tuple[int, float, float]] = []     # (step, train seconds, validation EM)
        self.target_reached: dict | None = None                          # {"step", "train_seconds", "exact_match"}
        self.train_seconds = 0.0

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers], "step": self.step,
                "loss_curve": self.loss_curve, "gate_history": self.gate_history,
                "validation_curve": self.validation_curve, "train_seconds": self.train_seconds,
                "exact_match_curve": self.exact_match_curve, "target_reached": self.target_reached,
                "data_rng": self.stream.rng.getstate(), "attention": self.attention, "config": self.config.as_dict(),
                "seed": self.seed}

    def load(self, path: Path) -> None:
        """Continue from a checkpoint of the SAME run (attention, seed and recipe), on any device."""
        # Loaded on the CPU, then copied into this trainer's model and optimisers on their device, so a checkpoint
        # written on a GPU resumes on a CPU and the other way round. The only random state is the data stream's
        # (a Python RNG): training draws no torch random numbers after building the model, so none are saved.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["attention"] != self.attention or state["seed"] != self.seed:
            raise ValueError(f"checkpoint {path} is for attention={state['attention']!r} seed={state['seed']}, "
                             f"not attention={self.attention!r} seed={self.seed}")
        differing = {k: (v, state["config"].get(k)) for k, v in self.config.as_dict().items() if state["config"].get(k) != v}
        if differing:
            raise ValueError(f"checkpoint {path} was trained with another recipe; (asked, in checkpoint): {differing}. "
                             "Resume with the same TrainConfig, or start a fresh run in another directory")
        self.model.load_state_dict(state["model"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)                          # moves its state to the parameters' device
        self.step, self.loss_curve = state["step"], [tuple(x) for x in state["loss_curve"]]
        self.gate_history, self.train_seconds = state["gate_history"], state["train_seconds"]
        self.validation_curve = [tuple(x) for x in state["validation_curve"]]
        self.exact_match_curve = [tuple(x) for x in state["exact_match_curve"]]
        self.target_reached = state["target_reached"]
        self.stream.rng.setstate(state["data_rng"])

    def train_step(self, batch: dict) -> float:
        lr = learning_rate(self.step, self.config)
        for group in (g for optimizer in self.optimizers for g in optimizer.param_groups):
            group["lr"] = lr
        loss = self.model(batch).loss                      # bf16 autocast inside when the recipe says bf16
        if not torch.isfinite(loss):
            last = f"the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path and \
                self.checkpoint_path.exists() else "no checkpoint was written yet"
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.step}; stopping; {last}")
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
        self.step += 1
        return loss.item()

    def run(self, stop_at: int | None = None, progress: bool = True) -> None:
        """Train until step `stop_at` (default: config.steps), or until the validation caption exact match has
        reached config.target_exact_match at config.target_checks checks in a row. Every `eval_every` steps: the validation loss and the mean gates on a fixed
        validation batch; every `checkpoint_every` steps: a checkpoint. Evaluation time is not training time."""
        stop_at = self.config.steps if stop_at is None else stop_at
        probe_batch = to_device(D.collate([D.encode(s) for s in D.load_split("validation")[:32]]), self.device)
        # The gates are also followed on text-only samples, without and with GATE_PROBE_IMAGES blank image tokens:
        # does the global gate learn to close for text when the image says nothing? (dilution.py reads it.)
        text_only = D.load_split("text_only")[:32]
        gate_batches = {"gates": probe_batch,
                        "gates_expand": to_device(D.collate([D.encode(s) for s in text_only]), self.device),
                        "gates_expand_images": to_device(D.collate([D.encode(s, GATE_PROBE_IMAGES) for s in text_only]), self.device)}
        target_scenes = D.load_split("validation")[:self.config.target_samples]
        target_batches = (teacher_forced_batches(target_scenes, device=self.device)   # encoded once, read each check
                          if self.config.target_exact_match is not None else None)
        bar = tqdm(total=stop_at, initial=self.step, desc=f"{self.attention} seed {self.seed}", disable=not progress)
        if self.step == 0 and not self.gate_history:           # the curves start at initialisation
            self._record_curves(probe_batch, gate_batches)
        while self.step < stop_at and self.target_reached is None:
            start = time.perf_counter()
            self.model.train()
            loss = self.train_step(to_device(self.stream.next(), self.device))
            self.train_seconds += time.perf_counter() - start
            self.loss_curve.append((self.step, loss))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                self._record_curves(probe_batch, gate_batches)
            if self.config.target_exact_match is not None and self.step % self.config.target_every == 0:
                reached = exact_match(self.model, target_scenes, batches=target_batches)["exact_match"]
                self.exact_match_curve.append((self.step, self.train_seconds, reached))
                bar.set_postfix(loss=f"{loss:.3f}", exact_match=f"{reached:.3f}")
                if rule_fires(self.exact_match_curve, self.config.target_exact_match, self.config.target_checks):
                    self.target_reached = {"step": self.step, "train_seconds": self.train_seconds,
                                           "exact_match": reached}
            if self.checkpoint_path and (self.step % self.config.checkpoint_every == 0 or self.step == stop_at
                                         or self.target_reached is not None):
                save_checkpoint(self.checkpoint_path, self.state())
        bar.close()

    def _record_curves(self, probe_batch: dict, gate_batches: dict) -> None:
        """The validation loss on a fixed batch and the mean gates on each gate batch, at the current step."""
        self.model.eval()
        with torch.no_grad():
            self.validation_curve.append((self.step, self.model(probe_batch).loss.item()))
        self.gate_history.append({"step": self.step, **{name: gate_means(self.model, batch)
                                                         for name, batch in gate_batches.items()}})

    @property
    def finished(self) -> bool:
        """True when the run is over: its step budget is spent or its target was reached."""
        return self.step >= self.config.steps or self.target_reached is not None
