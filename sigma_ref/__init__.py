"""sigma_ref: a small, readable reference implementation of SIGMA attention, for the course notebooks.

    import sigma_ref as sr
    ids = sr.layout("T4 I16 T8")                       # modality ids, TEXT = 0, IMAGE = 1
    attn = sr.SigmaAttention(sr.AttentionConfig(hidden_size=128, num_heads=8))
    y, details = attn(x, ids, return_details=True)     # x: [B, S, 128]

THE CORE, what a learner reads beside the notebooks, one concept per module; imports flow one way (each
module imports only modules above it):

    runtime       fast mode, device, threads, where runs live, atomic writes (imports nothing of ours)
    masks         modality ids, layouts, the causal / intra / per-head masks, FlexAttention mask_mods
    kernels/      causal attention within groups: the contract and ONE dispatcher; one file per backend
    attention     AttentionConfig, StandardAttention, GatedAttention (Qwen G1), SigmaAttention
    model         TinyMLLM: embeddings, pre-norm blocks with a pluggable attention, generate()
    data          the toy captioning set: scenes, vocabulary, encoding, training stream, shipped splits
    evaluate      exact match, slot accuracy, dilution; loading a trained model
    probes        latte measurements: cross-modal mass, contamination, gates, sinks
    optim         Muon with a float32 Newton-Schulz iteration (fast on CPUs too)
    train         TrainConfig, presets, Trainer, checkpoints
    viz           matplotlib figures drawn from arrays and results
    widgets       ipywidgets panels over plain, tested callbacks

THE TOOLING, in subpackages that import the core and that the core never imports:

    lab/          experiments (compare, ensure_trained), dilution, bench, lower_bounds, speedrun, gpucheck
    teaching/     course: exercises, learner copies (`release`), the executed book (`book`)
    testing/      doubles: flash-attn's functions in pure PyTorch, to prove the flash path on a CPU
    __main__      the command line over all of them

`import sigma_ref` loads the core's first floors (masks, kernels, attention) only; every other module is
imported on first use (`sr.viz`, `sr.train`, `sr.experiments` for sigma_ref.lab.experiments, ...), so
matplotlib and ipywidgets load only when a figure or widget is asked for.
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

# The core's heavier modules, and the lab's and teaching's under the short names the notebooks use
# (`sr.experiments` is sigma_ref.lab.experiments), each imported on first use.
_LAZY_MODULES = {name: name for name in ("model", "data", "evaluate", "probes", "optim", "train", "viz", "widgets",
                                         "runtime", "lab", "teaching", "testing")}
_LAZY_MODULES.update({name: f"lab.{name}" for name in ("experiments", "bench", "lower_bounds", "speedrun",
                                                       "dilution", "gpucheck")})
_LAZY_MODULES["course"] = "teaching.course"
_LAZY_NAMES = {"TinyMLLM": "model", "ModelConfig": "model"}


def __getattr__(name: str):
    """Import the heavier submodules (and a few names from them) on first use: `sr.viz`, `sr.TinyMLLM`."""
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{_LAZY_MODULES[name]}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'sigma_ref' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))
