"""sigma_ref: a small, readable reference implementation of SIGMA attention, for the course notebooks.

    import sigma_ref as sr
    ids = sr.layout("T4 I16 T8")                       # modality ids, TEXT = 0, IMAGE = 1
    attn = sr.SigmaAttention(sr.AttentionConfig(hidden_size=128, num_heads=8))
    y, details = attn(x, ids, return_details=True)     # x: [B, S, 128]

One concept per module: masks, kernels, attention (this is the core); model, data, train, probes, viz,
widgets and bench build on it.
"""

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
from .kernels import BACKENDS, grouped_causal_attention, sigma_attention
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
from . import attention, bench, data, kernels, masks, model, probes, runtime, train, viz, widgets  # noqa: E402

__version__ = "0.1.0"
