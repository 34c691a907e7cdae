"""sigma_ref: a small, readable reference implementation of SIGMA attention, for the course notebooks.

    import sigma_ref as sr
    ids = sr.layout("T4 I16 T8")                       # modality ids, TEXT = 0, IMAGE = 1
    attn = sr.SigmaAttention(sr.AttentionConfig(hidden_size=128, num_heads=8))
    y, details = attn(x, ids, return_details=True)     # x: [B, S, 128]

The package map, one concept per module, imports flowing one way (each module imports only modules above it):

    masks         modality ids, layouts, the causal / intra / per-head masks, FlexAttention mask_mods
    kernels/      causal attention within groups: the contract and ONE dispatcher; one file per backend
    attention     AttentionConfig, StandardAttention, GatedAttention (Qwen G1), SigmaAttention
    model         TinyMLLM: embeddings, pre-norm blocks with a pluggable attention, generate()
    data          the toy captioning set: scenes, vocabulary, encoding, training stream, shipped splits
    evaluate      exact match, slot accuracy, dilution; loading a trained model
    probes        latte measurements: cross-modal mass, contamination, gates, sinks
    optim         Muon with a float32 Newton-Schulz iteration (fast on CPUs too)
    floors        what SIGMA would cost with an overhead taken away, timed beside it by bench
    train         TrainConfig, presets, Trainer, checkpoints
    viz           matplotlib figures drawn from arrays and results
    experiments   ensure_trained, compare, summary tables, which figures a run gets
    widgets       ipywidgets panels over plain, tested callbacks
    bench         attention, memory and training-step benchmarks
    speedrun      time-to-accuracy, the recipe's speedrun log, training threads
    gpucheck      `gpu-check`: backends vs math in bf16, the GPU benchmark, the gpu preset (CUDA only)
    dilution      the dilution experiment: two training mixes, 0..8k irrelevant image tokens, SIGMA's ablations
    runtime       fast mode, device, where runs live, atomic writes (used by every floor; imports none)

`import sigma_ref` loads the core (masks, kernels, attention) only; every other module is imported on first
use (`sr.viz`, `sr.train`, ...), so matplotlib and ipywidgets load only when a figure or widget is asked for.
"""

from __future__ import annotations

import importlib

from .attention import (
    DEFAULT_BIAS_INIT,
    GLOBAL,
    INTRA,
    AttentionConfig,
    AttentionDetails,
    GatedAttention,
    SigmaAttention,
    StandardAttention,
    make_attention,
)
from .kernels import BACKENDS, GroupLayout, grouped_causal_attention, sigma_attention
from .masks import (
    IMAGE,
    NUM_MODALITIES,
    TEXT,
    causal_mask,
    causal_mask_mod,
    intra_mask,
    intra_mask_mod,
    layout,
    layout_string,
    sigma_mask,
    sigma_mask_mod,
)
from .runtime import course_preset, course_seeds, fast_mode

__version__ = "0.2.0"

_LAZY_MODULES = ("model", "data", "evaluate", "probes", "optim", "floors", "train", "viz", "experiments", "widgets", "bench", "speedrun", "gpucheck", "dilution", "runtime")
_LAZY_NAMES = {"TinyMLLM": "model", "ModelConfig": "model"}


def __getattr__(name: str):
    """Import the heavier submodules (and a few names from them) on first use: `sr.viz`, `sr.TinyMLLM`."""
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'sigma_ref' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))
