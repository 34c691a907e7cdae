"""sigma_ref: a small, readable reference implementation of SIGMA attention, for the course notebooks.

    import sigma_ref as sr
    ids = sr.layout("T4 I16 T8")                       # modality ids, TEXT = 0, IMAGE = 1
    attn = sr.SigmaAttention(sr.AttentionConfig(hidden_size=128, num_heads=8))
    y, details = attn(x, ids, return_details=True)     # x: [B, S, 128]

The core, what a learner reads beside the notebooks, sits at the top level, one concept per module, imports
flowing one way; the tooling (lab/, teaching/, testing/) lives in subpackages that the core never imports.
README.md's package map lists every module with its docstring's first sentence.

`import sigma_ref` loads masks, kernels and attention only; every other module is
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
_LAZY_MODULES = {name: name for name in ("moda", "var", "model", "data", "evaluate", "probes", "optim", "train",
                                         "viz", "widgets", "runtime", "lab", "teaching", "testing")}
_LAZY_MODULES.update({name: f"lab.{name}" for name in ("experiments", "bench", "lower_bounds", "speedrun",
                                                       "dilution", "gpucheck", "var_study", "stats")})
_LAZY_MODULES["course"] = "teaching.course"
_LAZY_NAMES = {"TinyMLLM": "model", "ModelConfig": "model", "make_attention": "model", "ATTENTIONS": "model",
               "ModaAttention": "moda"}


def __getattr__(name: str):
    """Import the heavier submodules (and a few names from them) on first use: `sr.viz`, `sr.TinyMLLM`."""
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{_LAZY_MODULES[name]}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'sigma_ref' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))
