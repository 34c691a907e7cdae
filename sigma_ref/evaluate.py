"""Evaluate a trained TinyMLLM: greedy captions, exact match, per-slot accuracy, dilution; load a checkpoint.

    evaluate(model, scenes)            exact match, per-slot accuracy and caption loss on a list of scenes
    exact_match(model, scenes)         exact match and caption loss in one forward pass, without decoding
    teacher_forced_batches(scenes)     its batches, encoded once for a caller that reads the same scenes often
    dilution(model, scenes)            text-only accuracy and loss with blank / noise image tokens inserted
    evaluate_all(model, samples)       every model metric that metrics.json records
    load_model(checkpoint, device)     a trained model from the trainer's checkpoint, ready to evaluate

Exact match compares the generated caption with the reference word for word; the slot accuracies say which
part went wrong (size, colour, shape of each object, relation).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from . import data as D
from .kernels import flash
from .model import ModelConfig, TinyMLLM

DILUTION_TOKENS = (0, 16, 64)          # image tokens inserted into the text-only task
MAX_CAPTION_TOKENS = 16                # what greedy decoding writes at most: a caption and its <eos>


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def prompt_of(example: D.Example) -> D.Example:
    """The example cut after <answer>: what the model sees before it writes the caption."""
    n = example.answer_start
    return D.Example(example.tokens[:n], example.modality[:n], example.patch_index[:n], example.patches, n,
                     example.caption)


def encoded_chunks(scenes: list[dict], inserted: int, kind: str, batch_size: int):
    """The scenes encoded (image tokens inserted with a fixed generator, so every evaluation sees the same ones),
    and chunks of at most `batch_size` indices whose prompts have one length (generate() needs that)."""
    if not scenes:
        raise ValueError("scenes: expected at least one scene to evaluate, got none")
    generator = torch.Generator().manual_seed(0)
    examples = [D.encode(s, inserted, kind, generator) for s in scenes]
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_length.setdefault(e.answer_start, []).append(i)
    return examples, [indices[start:start + batch_size] for indices in by_length.values()
                      for start in range(0, len(indices), batch_size)]


@torch.no_grad()
def evaluate(model: TinyMLLM, scenes: list[dict], inserted: int = 0, kind: str = "blank",
             batch_size: int = 128) -> dict:
    """Greedy captions for `scenes`: exact match, per-slot accuracy, and the mean caption loss."""
    model.eval()
    device = next(model.parameters()).device
    examples, chunks = encoded_chunks(scenes, inserted, kind, batch_size)
    predictions: list[list[str] | None] = [None] * len(examples)
    losses = []
    for chunk in chunks:
        prompts = to_device(D.collate([prompt_of(examples[i]) for i in chunk]), device)
        for i, ids in zip(chunk, model.generate(prompts, max_new_tokens=MAX_CAPTION_TOKENS)):
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


def teacher_forced_batches(scenes: list[dict], inserted: int = 0, kind: str = "blank", batch_size: int = 128,
                           device="cpu") -> list[dict]:
    """The scenes encoded and collated once into exact_match's batches (whole sequences, prompts of one length
    per batch), on `device`: a caller that reads the same scenes many times (the stopping rule, every 25 steps)
    passes these instead of the scenes and skips encoding them again."""
    examples, chunks = encoded_chunks(scenes, inserted, kind, batch_size)
    if max(len(e.caption) for e in examples) >= MAX_CAPTION_TOKENS:
        raise ValueError(f"scenes: every caption must be shorter than {MAX_CAPTION_TOKENS} words for a teacher-forced "
                         f"exact match (what evaluate() decodes, <eos> included), got "
                         f"{max(len(e.caption) for e in examples)}")
    return [to_device(D.collate([examples[i] for i in chunk]), device) for chunk in chunks]


@torch.no_grad()
def exact_match(model: TinyMLLM, scenes: list[dict] | None, inserted: int = 0, kind: str = "blank",
                batch_size: int = 128, batches: list[dict] | None = None) -> dict:
    """evaluate()'s exact match and caption loss from one teacher-forced forward pass, without decoding.

    Greedy decoding writes the reference caption exactly when, at every answer position, the reference's next
    token (each caption word, then <eos>) is the model's top choice given the reference before it: each step's
    prefix is then the reference's, so decoding never leaves it. One pass over the full sequences (the pass
    that computes the loss) therefore gives the same exact match as generate(), up to exact ties in the
    arg-max, at a fraction of the cost: the stopping rule checks 300 scenes every 25 steps with it. What it
    cannot give is what a wrong caption looks like (slot accuracies, examples): evaluate() decodes for those.
    Nor can it read a model whose attention is being edited (VAR, var.redistributing): the edit finds its sinks
    at the prefill, which here would hold the caption too, so it would differ from decoding. A model whose
    attention sees later tokens (MODA as released, `sees_future`) would read the caption it is asked to write
    in that pass: for it, the exact match is read by decoding the scenes (evaluate()), the loss as evaluate()
    reads it. `batches` (teacher_forced_batches of these scenes) replaces encoding them here.
    """
    if any(block.attn.probs_edit is not None for block in model.blocks):
        raise ValueError("exact_match: the model's attention is being edited (probs_edit is set, e.g. inside "
                         "var.redistributing); expected a plain model: use evaluate(), which decodes")
    if any(block.attn.sees_future for block in model.blocks):
        if scenes is None:
            raise ValueError("exact_match: the model's attention sees later tokens (sees_future: MODA with "
                             "moda_causal=False), so it must decode; expected the scenes, got only batches")
        decoded = evaluate(model, scenes, inserted, kind, batch_size)
        return {"exact_match": decoded["exact_match"], "loss": decoded["loss"]}
    model.eval()
    device = next(model.parameters()).device
    batches = batches if batches is not None else teacher_forced_batches(scenes, inserted, kind, batch_size, device)
    if not batches:
        raise ValueError("batches: expected at least one batch of teacher_forced_batches(), got none")
    correct, losses, count = 0, [], 0
    for batch in batches:
        out = model(batch)
        targets = batch["targets"]                                        # [B, S], IGNORE off the answer
        right = (out.logits.argmax(-1) == targets) | (targets == D.IGNORE)   # [B, S]
        correct += int(right.all(-1).sum())
        losses.append(out.loss.item() * len(targets))
        count += len(targets)
    return {"exact_match": correct / count, "loss": sum(losses) / count}


def dilution(model, scenes: list[dict] | None = None, counts=DILUTION_TOKENS, kinds=("blank", "noise")) -> dict:
    """Text-only accuracy and loss with image tokens inserted: {kind: {count: {"accuracy", "loss"}}} (exact_match:
    the greedy exact match, read without decoding)."""
    scenes = scenes if scenes is not None else D.load_split("text_only")
    result = {}
    for kind in kinds:
        result[kind] = {}
        for n in counts:
            r = exact_match(model, scenes, n, kind)
            result[kind][n] = {"accuracy": r["exact_match"], "loss": r["loss"]}
    return result


def evaluate_all(model: TinyMLLM, samples: int) -> dict:
    """Every metric of metrics.json that comes from the model (not from the training run)."""
    test = evaluate(model, D.load_split("test")[:samples])
    diluted = dilution(model, D.load_split("text_only")[:samples])
    return {
        "caption_exact_match": test["exact_match"],
        "slot_accuracy": test["slot_accuracy"],
        "test_loss": test["loss"],
        "compositional_exact_match": exact_match(model, D.load_split("compositional")[:samples])["exact_match"],
        "text_only_accuracy": diluted["blank"][0]["accuracy"],
        "dilution": {kind: {str(n): r["accuracy"] for n, r in rows.items()} for kind, rows in diluted.items()},
        "dilution_loss": {kind: {str(n): r["loss"] for n, r in rows.items()} for kind, rows in diluted.items()},
        "samples": test["examples"],
    }


def load_model(checkpoint: str | Path, device="cpu") -> TinyMLLM:
    """A trained TinyMLLM from a checkpoint written by the trainer, in eval mode, on any device.

    A model trained with backend="flash" is loaded with backend="auto" where flash cannot run (a CPU without
    a substitute), and a warning says so: the weights are the same, only the kernel changes. The precision
    policy (ModelConfig.precision) travels with the model.
    """
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    # The whole run's config holds the model's; checkpoints written before it did kept it flat, beside it.
    config = ModelConfig.from_dict(state["config"]["model"] if "model" in state["config"] else state["model_config"])
    device_type = torch.device(device).type
    flash_here = flash.implementation(device_type)
    if config.attn.backend == "flash" and (flash_here is None or (flash_here.requires_cuda and device_type != "cuda")):
        warnings.warn(f"{checkpoint} was trained with backend='flash', which needs CUDA; loading it on "
                      f"{device} with backend='auto' (same weights, another exact kernel)", stacklevel=2)
        config = config.updated(backend="auto")
    model = TinyMLLM(config).to(device)
    model.load_state_dict(state["model"])
    return model.eval()
