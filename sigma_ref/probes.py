"""Latte measurements: what stays pure, what mixes, and where the gates open.

Each probe takes a model (TinyMLLM) and a batch (data.collate) and returns plain numbers or numpy arrays, so
notebooks can print them, tests can check them on hand-made models, and viz.py can draw them.

    cross_modal_mass   attention mass text -> image and image -> text, per layer and head (math backend)
    contamination      how much a text token's intra stream, global stream and residual stream move when
                       the image changes, per layer
    gate_means         mean gate per layer, stream and modality (recorded over training by the trainer)
    token_gates        per-token gates of one sequence: which words open the global gate
    attention_sinks    first-token attention fraction and largest activation, per layer

What the seed glosses over, measured here rather than argued: the intra stream of layer 0 is exactly pure,
but from layer 1 on a text token's RESIDUAL stream already carries image information (through the global
heads of earlier layers), so deeper intra streams read image information second-hand.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import data as D
from .masks import IMAGE, TEXT

MODALITIES = {"text": TEXT, "image": IMAGE}
CONTENT_WORDS = frozenset(D.COLOURS) | frozenset(D.SHAPES) | frozenset(D.SIZES)


@contextlib.contextmanager
def math_backend(model):
    """Run every attention layer of `model` with the math backend (which returns probabilities)."""
    configs = [block.attn.config for block in model.blocks]
    saved = [c.backend for c in configs]
    try:
        for c in configs:
            c.backend = "math"
        yield model
    finally:
        for c, b in zip(configs, saved):
            c.backend = b


def real_tokens(batch: dict) -> torch.Tensor:
    """[B, S] True for every token that is not right padding."""
    return batch["tokens"] != D.PAD


def head_streams(model, layer: int = 0) -> list[str]:
    """'intra' or 'global' for each head of a layer (standard and gated attention: all global)."""
    split = model.blocks[layer].attn.num_intra_heads
    return ["intra" if h < split else "global" for h in range(model.config.num_heads)]


@torch.no_grad()
def cross_modal_mass(model, batch: dict) -> dict:
    """Mean attention probability that text queries put on image keys, and image queries on text keys.

    Returns {"text_to_image": [L, H], "image_to_text": [L, H], "streams": [H]}. Only queries that CAN see
    the other modality count (a text token before the image has no image key to attend to), and padding is
    left out. SIGMA's intra heads give exactly 0: their mask removes those keys before the softmax.
    """
    model.eval()
    with math_backend(model):
        details = model(batch, return_details=True).details
    modality, real = batch["modality"], real_tokens(batch)
    result = {}
    for name, (q_mod, k_mod) in {"text_to_image": (TEXT, IMAGE), "image_to_text": (IMAGE, TEXT)}.items():
        is_key = (modality == k_mod) & real                                    # [B, S]
        can_see = torch.cumsum(is_key.long(), 1) > 0                          # an earlier (or same) key exists
        queries = (modality == q_mod) & real & can_see                         # [B, S]
        per_layer = []
        for d in details:
            mass = (d.attn_probs * is_key[:, None, None, :]).sum(-1)          # [B, H, S]
            per_layer.append(mass.permute(1, 0, 2)[:, queries].mean(-1) if queries.any()
                             else torch.full((mass.shape[1],), float("nan")))
        result[name] = torch.stack(per_layer).numpy()                          # [L, H]
    result["streams"] = head_streams(model)
    return result


def _perturbed_image(batch: dict, seed: int = 0) -> dict:
    """The same batch with every image patch replaced by another scene's patches (rows rolled by one)
    plus noise, so that every text token's image has changed. Text is untouched."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch["patches"].shape, generator=g)
    is_image = (batch["modality"] == IMAGE)[..., None]
    patches = torch.where(is_image, 0.5 * batch["patches"].roll(1, 0) + 0.5 * noise, batch["patches"])
    return dict(batch, patches=patches)


@torch.no_grad()
def contamination(model, batch: dict) -> dict:
    """How much each text token's representation depends on the image, per layer.

    For text tokens that come after an image, the relative change ||h(image') - h(image)|| / ||h(image)||
    when the image is replaced, for: the intra stream output (before gating), the global stream output, and
    the residual stream after the block. Returns {"intra": [L], "global": [L], "residual": [L]}; the intra
    entry is NaN for models without an intra stream. Exactly 0 means the image never entered.
    """
    model.eval()
    a = model(batch, return_details=True)
    b = model(_perturbed_image(batch), return_details=True)
    seen_image = torch.cumsum((batch["modality"] == IMAGE).long(), 1) > 0
    text = (batch["modality"] == TEXT) & real_tokens(batch) & seen_image

    def relative_change(x, y):
        if x.shape[-1] == 0 or not text.any():
            return float("nan")
        x, y = x[text], y[text]
        return ((y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean().item()

    return {"intra": np.array([relative_change(da.o_intra, db.o_intra) for da, db in zip(a.details, b.details)]),
            "global": np.array([relative_change(da.o_global, db.o_global) for da, db in zip(a.details, b.details)]),
            "residual": np.array([relative_change(ha, hb) for ha, hb in zip(a.hidden_states[1:], b.hidden_states[1:])])}


@torch.no_grad()
def gate_means(model, batch: dict) -> list[dict]:
    """Mean gate value per layer, stream and modality: [{"intra": {"text": .., "image": ..}, "global": {..}}, ..].

    Streams without a gate are left out (standard attention: every layer is {}). Padding is excluded.
    """
    model.eval()
    details = model(batch, return_details=True).details
    real = real_tokens(batch)
    layers = []
    for d in details:
        layer = {}
        for stream, gate in (("intra", d.g_intra), ("global", d.g_global)):
            if gate is None:
                continue
            layer[stream] = {name: gate[(batch["modality"] == m) & real].mean().item()
                             for name, m in MODALITIES.items() if ((batch["modality"] == m) & real).any()}
        layers.append(layer)
    return layers


@torch.no_grad()
def token_gates(model, batch: dict, row: int = 0) -> dict:
    """Per-token mean gate of one sequence: {"tokens": [S] words, "intra": [L, S], "global": [L, S]}.

    Image tokens are labelled "img"; a stream without a gate is absent.
    """
    model.eval()
    details = model(batch, return_details=True).details
    n = int(real_tokens(batch)[row].sum())
    words = ["img" if m == IMAGE else D.VOCAB[t]
             for t, m in zip(batch["tokens"][row, :n].tolist(), batch["modality"][row, :n].tolist())]
    out = {"tokens": words}
    for stream in ("intra", "global"):
        gates = [getattr(d, f"g_{stream}") for d in details]
        if all(g is not None for g in gates):
            out[stream] = np.stack([g[row, :n].mean(-1).numpy() for g in gates])
    return out


@torch.no_grad()
def gate_by_word_class(model, batch: dict) -> dict:
    """Mean global gate on caption words: content words (colour, shape, size) vs function words.

    The question: does the model open its cross-modal stream where the image matters? Returns
    {"content": [L], "function": [L]} (the gate at the token that PREDICTS the next word is what matters for
    that word, so each caption word is credited to the position just before it).
    """
    model.eval()
    details = model(batch, return_details=True).details
    if details[0].g_global is None:
        raise ValueError("gate_by_word_class: this model's global stream has no gate (standard attention)")
    targets = batch["targets"]
    is_target = targets != D.IGNORE
    words = torch.where(is_target, targets, torch.zeros_like(targets))
    content_ids = torch.tensor([D.TOKEN_ID[w] for w in CONTENT_WORDS])
    is_content = is_target & torch.isin(words, content_ids)
    is_function = is_target & ~is_content & (words != D.EOS)
    return {name: np.array([d.g_global.mean(-1)[mask].mean().item() for d in details])
            for name, mask in (("content", is_content), ("function", is_function))}


@torch.no_grad()
def attention_sinks(model, batch: dict) -> dict:
    """The Gated Attention paper's two measures, per layer, and what uniform attention would give.

    first_token: mean attention probability on the first token (the "attention sink"), over the (query, head)
    pairs that may attend to it: every real query after the first for a global head, and for an intra head only
    the queries of token 0's modality (an intra head's image query cannot see a text token 0, and counting its
    0 would make the sink look smaller than it is). uniform_baseline: the same mean if every head attended
    uniformly over the keys its mask allows, 1 / (allowed keys), the level a model with no sink sits near.
    max_activation: the largest |value| in the residual stream after the block.
    """
    model.eval()
    with math_backend(model):
        out = model(batch, return_details=True)
    real = real_tokens(batch)                                     # [B, S]
    modality = batch["modality"]
    later = real.clone()
    later[:, 0] = False                                           # query 0 can only attend to itself
    same_as_first = modality == modality[:, :1]                   # [B, S]: may an intra query see token 0?
    # Keys an intra head's query i may attend to: earlier real tokens of its own modality (itself included).
    same = (modality[:, :, None] == modality[:, None, :]) & real[:, None, :]            # [B, S, S]
    intra_keys = (same & torch.ones_like(same).tril()).sum(-1)                          # [B, S]
    all_keys = torch.arange(1, real.shape[1] + 1).expand_as(real)                       # [B, S]: i + 1
    first, baseline = [], []
    for block, d in zip(model.blocks, out.details):
        heads = d.attn_probs.shape[1]
        intra = torch.arange(heads) < getattr(block.attn, "num_intra_heads", 0)         # [H]
        pairs = later[:, None, :] & (~intra[None, :, None] | same_as_first[:, None, :])  # [B, H, S]
        keys = torch.where(intra[None, :, None], intra_keys[:, None, :], all_keys[:, None, :])
        first.append(d.attn_probs[..., 0][pairs].mean().item())
        baseline.append((1 / keys.float())[pairs].mean().item())
    peak = [h[real].abs().max().item() for h in out.hidden_states[1:]]
    return {"first_token": np.array(first), "uniform_baseline": np.array(baseline), "max_activation": np.array(peak)}


def probe_batch(split: str = "validation", size: int = 64) -> dict:
    """A fixed batch of describe scenes to probe with (the same for every model)."""
    return D.collate([D.encode(s) for s in D.load_split(split)[:size]])
