"""Three attention layers side by side: standard, Gated Attention (Qwen "G1") and SIGMA.

All three share the same skeleton, so the differences are easy to see:

    x [B, S, D] --q_proj/k_proj/v_proj--> q, k, v [B, H, S, d]          (d = D / H)
               --kernel------------------> per-head outputs [B, H, S, d]
               --(gates)-----------------> gated outputs, heads concatenated [B, S, D]
               --o_proj------------------> y [B, S, D]

    StandardAttention  every head causal over the whole mixed sequence; no gate.
    GatedAttention     the same heads, then y = o_proj(sigmoid(gate_proj(x)) * attn). Qwen's G1 position:
                       after SDPA, before o_proj, elementwise (or one value per head), computed from the
                       same layer input as the query, no bias, so every gate starts near sigmoid(0) = 0.5.
    SigmaAttention     heads 0..h-1 form the INTRA stream (same modality and causal), heads h..H-1 the GLOBAL
                       stream (causal over everything). Each stream has its own gate,
                           g_s = sigmoid(gate_s_proj(x) + B[s][modality(x)]),
                       where B, the stream bias, is the gate's only bias. Then
                           y = o_proj(cat(g_intra * o_intra, g_global * o_global)).

The modules treat standard and gated attention as "all heads are global", so `return_details=True` returns
the same `AttentionDetails` for all three and the probes in `probes.py` can compare them directly.

Calling a layer: `y = attn(x, modality_ids)`; x [B, S, D], modality_ids [S] or [B, S] (or a kernels.GroupLayout
shared by all layers of one forward); `valid` [B, S] bool marks right padding (False), whose outputs are 0.

Positions: these layers add no positional encoding; the model (model.py) adds learned positions to its
embeddings, which keeps the attention code about attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import kernels
from .checks import check_bool, check_choice, check_int, check_real
from .kernels import KVCache
from .masks import IMAGE, NUM_MODALITIES, TEXT, validate_modality_ids

INTRA, GLOBAL = 0, 1
STREAM_NAMES = {INTRA: "intra", GLOBAL: "global"}

# B[stream][modality] at initialisation. The seed fixes the text entries' signs: intra-text positive (text
# leans on within-text modelling), global-text negative (cross-modal mixing starts suppressed and is opened on
# demand). It leaves the image entries open; 0 (gate 0.5, neutral) is the choice that assumes least.
DEFAULT_BIAS_INIT = ((1.0, 0.0), (-1.0, 0.0))
MODA_GRAMS = ("kk", "kv")                  # what MODA's Gram matrix sums: k_hat k^T (paper) or k_hat v^T (code)
MODA_FUSER_INITS = ("identity", "released")


@dataclass
class AttentionConfig:
    """Everything an attention layer needs to know. Validated on creation.

    hidden_size      D, the model width.
    num_heads        H; D must be divisible by H.
    num_intra_heads  SIGMA only: heads 0..num_intra_heads-1 are the intra stream. None = half (H // 2).
    bias_init        SIGMA only: B[stream][modality] initial values, ((intra_text, intra_image),
                     (global_text, global_image)); each a number (broadcast over the stream's channels).
    use_gates        SIGMA ablation: False removes both gates (then y = o_proj(cat(o_intra, o_global))).
    use_stream_bias  SIGMA ablation: False removes B (gates become sigmoid(gate_s_proj(x))).
    headwise_gate    GatedAttention only: one gate value per head instead of one per channel.
    backend          the kernel: "auto", "math", "sdpa", "packed", "flex" or "flash" (see kernels/).
    moda_*           ModaAttention only (moda.py explains each): the Gram matrix ("kk" as in the paper, "kv" as
                     released), both aligners or image keys only (duplex), a causal Gram sum, the fuser's init
                     ("identity" or "released"), the pseudo-logit, and alignment at all (moda_align).
    """

    hidden_size: int = 128
    num_heads: int = 8
    num_intra_heads: int | None = None
    bias_init: tuple = DEFAULT_BIAS_INIT
    use_gates: bool = True
    use_stream_bias: bool = True
    headwise_gate: bool = False
    backend: str = "auto"
    moda_gram: str = "kk"
    moda_duplex: bool = True
    moda_causal: bool = True
    moda_fuser_init: str = "identity"
    moda_pseudo_logit: bool = True
    moda_align: bool = True

    def __post_init__(self):
        check_int("hidden_size", self.hidden_size, low=1)
        check_int("num_heads", self.num_heads, low=1)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size must be divisible by num_heads, got hidden_size={self.hidden_size} "
                             f"and num_heads={self.num_heads} (remainder {self.hidden_size % self.num_heads})")
        if self.num_intra_heads is None:
            self.num_intra_heads = self.num_heads // 2
        check_int("num_intra_heads", self.num_intra_heads, 0, self.num_heads, why="(0..num_heads)")
        self.bias_init = _check_bias_init(self.bias_init)
        for name in ("use_gates", "use_stream_bias", "headwise_gate", "moda_duplex", "moda_causal",
                     "moda_pseudo_logit", "moda_align"):
            check_bool(name, getattr(self, name))
        check_choice("backend", self.backend, kernels.BACKENDS)
        check_choice("moda_gram", self.moda_gram, MODA_GRAMS)
        check_choice("moda_fuser_init", self.moda_fuser_init, MODA_FUSER_INITS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intra_dim(self) -> int:
        """Channels of the intra stream (its heads concatenated)."""
        return self.num_intra_heads * self.head_dim

    @property
    def global_dim(self) -> int:
        return self.hidden_size - self.intra_dim


def _check_bias_init(bias_init) -> tuple:
    expected = f"(({'x, ' * (NUM_MODALITIES - 1)}x), ({'x, ' * (NUM_MODALITIES - 1)}x)): 2 streams x {NUM_MODALITIES} modalities"
    if isinstance(bias_init, torch.Tensor):
        bias_init = bias_init.tolist()
    try:
        rows = [list(row) for row in bias_init]
    except TypeError:
        raise ValueError(f"bias_init must be nested as {expected}, got {bias_init!r}") from None
    if len(rows) != 2 or any(len(row) != NUM_MODALITIES for row in rows):
        shape = [len(row) for row in rows]
        raise ValueError(f"bias_init must have shape [2, {NUM_MODALITIES}] as {expected}; got {len(rows)} streams "
                         f"with {shape} entries")
    for row in rows:
        for value in row:
            check_real(f"bias_init entry (in {bias_init!r})", value)
    return tuple(tuple(float(v) for v in row) for row in rows)


@dataclass
class AttentionDetails:
    """What happened inside one attention call (all [B, S, channels] unless noted).

    o_intra, o_global  each stream's attention output BEFORE gating, its heads concatenated. Standard and
                       gated attention have no intra stream: o_intra has 0 channels.
    g_intra, g_global  the gates (None where a layer has no gate), the same shape as the stream they scale
                       (a headwise gate's value repeated over its head's channels).
    attn_probs         [B, H, S, S] attention probabilities from the math backend, else None.
    """

    o_intra: torch.Tensor
    o_global: torch.Tensor
    g_intra: torch.Tensor | None
    g_global: torch.Tensor | None
    attn_probs: torch.Tensor | None


def prepare_layout(modality_ids, x: torch.Tensor, valid=None) -> kernels.GroupLayout:
    """Check modality ids ([S] or [B, S], values in 0..NUM_MODALITIES-1) against x [B, S, D]; the layout
    every layer of one forward shares. `valid` [B, S] bool marks right padding (False)."""
    ids = validate_modality_ids(modality_ids, "modality_ids")
    batch, seq_len = x.shape[:2]
    if ids.dim() not in (1, 2) or ids.shape[-1] != seq_len or (ids.dim() == 2 and ids.shape[0] != batch):
        raise ValueError(f"modality_ids must have shape [seq] = [{seq_len}] or [batch, seq] = [{batch}, {seq_len}] "
                         f"to match x of shape {list(x.shape)}, got {list(modality_ids.shape)}")
    return kernels.GroupLayout.of(ids, batch, seq_len, x.device, valid, name="modality_ids")


class _Attention(nn.Module):
    """The shared skeleton: q/k/v/o projections, input checks, and the two routes to the same function.

    `forward(..., return_details=True)` computes the layer as its class docstring defines it, step by step,
    and returns what happened inside. Without details the layer calls `kernels.attention_layer` once, which
    computes the same function by the cheapest exact route (kernels/fused.py); tests hold the two equal.
    """

    num_intra_heads = 0          # standard and gated attention: every head is global
    # A function of the attention probabilities [B, H, Q, S] applied after the softmax, before they weight the
    # values; None: attention as trained. var.redistributing() sets it (VAR, a training-free edit).
    probs_edit = None
    # True where a query's output depends on LATER tokens (MODA as released: its Gram sum covers the whole
    # sequence). Such a layer is causal only in its softmax; a teacher-forced pass then reads the answer it is
    # asked to write, so evaluate.exact_match decodes instead.
    sees_future = False

    def __init__(self, config: AttentionConfig):
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise ValueError(f"config must be an AttentionConfig, got {type(config).__name__}")
        self.config = config
        D = config.hidden_size
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def _inputs(self, x, modality_ids, valid=None) -> kernels.GroupLayout:
        """Check x against this module and return the batch's GroupLayout (ids checked once, here)."""
        D = self.config.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != D:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape [batch, seq, hidden_size={D}], got {shape}")
        weight = self.q_proj.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on {weight.device}; "
                             f"move one of them (x.to({str(weight.device)!r}) or module.to({str(x.device)!r}))")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x has dtype {x.dtype} but the module's parameters are {weight.dtype}; cast one of "
                             f"them (x.to({weight.dtype}) or module.to({x.dtype})) or run under torch.autocast")
        if isinstance(modality_ids, kernels.GroupLayout):
            if (modality_ids.batch, modality_ids.seq_len) != tuple(x.shape[:2]):
                raise ValueError(f"modality_ids is a GroupLayout for [batch, seq] = [{modality_ids.batch}, "
                                 f"{modality_ids.seq_len}], but x has [batch, seq] = {list(x.shape[:2])}")
            return modality_ids
        return prepare_layout(modality_ids, x, valid)

    def weights(self) -> kernels.LayerWeights:
        """This layer's weights as the kernels take them; subclasses with a gate add it."""
        return kernels.LayerWeights(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight)

    def fast_forward(self, x, layout: kernels.GroupLayout, cache: KVCache | None = None) -> torch.Tensor:
        """y [B, S, D]: the same function as the step-by-step forward, by the cheapest exact route."""
        return kernels.attention_layer(x, self.weights(), layout, self.config.num_heads, self.num_intra_heads,
                                       backend=self.config.backend, cache=cache, edit=self.probs_edit)

    def attend(self, x, layout: kernels.GroupLayout, cache: KVCache | None = None):
        """Every head's attention output, heads concatenated in head order: ([B, S, D], probs or None).
        Heads below num_intra_heads attend within their modality, the rest causally over everything; the
        probabilities [B, H, S, S] come from the math backend only."""
        return kernels.attend(x, self.weights(), layout, self.config.num_heads, self.num_intra_heads,
                              backend=self.config.backend, cache=cache, return_probs=self.config.backend == "math",
                              edit=self.probs_edit)


class StandardAttention(_Attention):
    """Causal multi-head attention over the mixed sequence: the "latte" baseline. y = o_proj(attention(x)).

    `modality_ids` is accepted (and checked) so the layers are interchangeable, but it does not change the
    result: every head sees every earlier token.
    """

    def forward(self, x, modality_ids, return_details: bool = False, cache: KVCache | None = None, valid=None):
        layout = self._inputs(x, modality_ids, valid)
        if not return_details:
            return self.fast_forward(x, layout, cache)
        o, probs = self.attend(x, layout, cache)                                   # [B, S, D]
        return self.o_proj(o), AttentionDetails(o[..., :0], o, None, None, probs)


class GatedAttention(_Attention):
    """Qwen's Gated Attention, G1 position: y = o_proj(sigmoid(gate_proj(x)) * attention(x)).

    Elementwise by default (gate_proj: D -> D); with `headwise_gate=True` one gate per head (D -> H), the
    paper's cheaper variant. No bias: the gate starts near 0.5 and has no modality information of its own,
    which is exactly what SIGMA's stream bias adds.
    """

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        gate_width = config.num_heads if config.headwise_gate else config.hidden_size
        self.gate_proj = nn.Linear(config.hidden_size, gate_width, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(gate_proj(x)) spread over every channel it scales: [B, S, D] (a headwise gate's value is
        repeated over its head's channels)."""
        gate = torch.sigmoid(self.gate_proj(x))                                    # [B, S, D] or [B, S, H]
        return gate.repeat_interleave(self.config.head_dim, -1) if self.config.headwise_gate else gate

    def weights(self) -> kernels.LayerWeights:
        gate = self.gate_proj.weight                                               # [D, D] or [H, D]
        if self.config.headwise_gate:                                              # one row per channel, tied per head
            gate = gate.repeat_interleave(self.config.head_dim, 0)
        return kernels.LayerWeights(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                                    self.o_proj.weight, gate)

    def forward(self, x, modality_ids, return_details: bool = False, cache: KVCache | None = None, valid=None):
        layout = self._inputs(x, modality_ids, valid)
        if not return_details:
            return self.fast_forward(x, layout, cache)
        o, probs = self.attend(x, layout, cache)                                   # [B, S, D]
        g = self.gate(x)                                                           # [B, S, D]
        return self.o_proj(g * o), AttentionDetails(o[..., :0], o, None, g, probs)


class StreamGates:
    """SIGMA's two gates and their stream bias, as a mixin: SigmaAttention and the layers that
    `sigma_ref.hf.sigmafy` converts hold the same parameters under the same names and compute the gates here.

        g_s = sigmoid(gate_s_proj(x) + B[s][modality(x)])      s = intra (channels 0..W_intra-1), global

    gate_intra_proj: D -> W_intra, gate_global_proj: D -> W_global (no bias; None when that stream has no heads
    or gates are off); stream_bias [2, M, max(W_intra, W_global)] or None. With an uneven split stream s uses
    the first W_s channels of its row; the rest of the narrower stream's row is unused (and gets no gradient).
    """

    def _init_stream_gates(self, input_size: int, widths: tuple[int, int], use_gates: bool, use_stream_bias: bool,
                           bias_init) -> None:
        self.stream_widths = tuple(widths)                                # (W_intra, W_global)

        def make_gate(width):
            return nn.Linear(input_size, width, bias=False) if (use_gates and width) else None

        self.gate_intra_proj = make_gate(widths[INTRA])
        self.gate_global_proj = make_gate(widths[GLOBAL])
        if use_gates and use_stream_bias:
            init = torch.tensor(bias_init)                                # [2, M]
            self.stream_bias = nn.Parameter(init[:, :, None].repeat(1, 1, max(widths)))   # [2, M, W]
        else:
            self.register_parameter("stream_bias", None)

    def stream_bias_for(self, stream: int, modality_ids: torch.Tensor) -> torch.Tensor:
        """B[stream][modality(x)] for each token: [B, S, W_stream]. The seed's `embedding(modality_id, ...)`."""
        return self.stream_bias[stream, :, :self.stream_widths[stream]][modality_ids]

    def gate(self, stream: int, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor | None:
        """g_stream = sigmoid(gate_stream_proj(x) + B[stream][modality]) [B, S, W_stream]; None without a gate."""
        proj = (self.gate_intra_proj, self.gate_global_proj)[stream]
        if proj is None:
            return None
        logits = proj(x)                                                  # [B, S, W_stream]
        if self.stream_bias is not None:
            logits = logits + self.stream_bias_for(stream, modality_ids)
        return torch.sigmoid(logits)

    def stacked_gates(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Both gates' weights stacked, intra rows first ([W_intra + W_global, D]), and the stream bias as one row
        per modality ([M, W_intra + W_global], intra channels first), or None without gates: one matmul and one
        lookup then compute both gates (kernels.gate_values)."""
        gated = [(s, proj) for s, proj in enumerate((self.gate_intra_proj, self.gate_global_proj)) if proj is not None]
        if not gated:
            return None
        weight = gated[0][1].weight if len(gated) == 1 else torch.cat([proj.weight for _, proj in gated])
        if self.stream_bias is None:
            return weight, None
        return weight, torch.cat([self.stream_bias[s, :, :self.stream_widths[s]] for s, _ in gated], dim=-1)

    def gates(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor | None:
        """Both gates, intra channels first: [B, S, W_intra + W_global] (None when gates are off; a stream
        without heads has none)."""
        parts = [g for g in (self.gate(INTRA, x, modality_ids), self.gate(GLOBAL, x, modality_ids)) if g is not None]
        return torch.cat(parts, -1) if parts else None


class SigmaAttention(StreamGates, _Attention):
    """Split-Stream Intra-Global Gated Multimodal Attention (docs/SIGMA.md states the idea).

        o_intra  = heads 0..h-1, each attending within its token's modality (causal)      [B, S, D_intra]
        o_global = heads h..H-1, each attending causally over everything                  [B, S, D_global]
        g_s      = sigmoid(gate_s_proj(x) + B[s][modality(x)])                            for s = intra, global
        y        = o_proj(cat(g_intra * o_intra, g_global * o_global))

    Parameters, named as in the seed:
        q_proj, k_proj, v_proj, o_proj      as in standard attention
        gate_intra_proj: D -> D_intra       (no bias; None when the intra stream has no heads or gates are off)
        gate_global_proj: D -> D_global     (no bias; likewise)
        stream_bias: [2, M, W]              B[stream][modality], W = max(D_intra, D_global). With the default
                                            even split W = D/2, exactly the seed's [2, 2, D/2].
    The gates are StreamGates' (above).
    """

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        self.num_intra_heads = config.num_intra_heads
        self._init_stream_gates(config.hidden_size, (config.intra_dim, config.global_dim), config.use_gates,
                                config.use_stream_bias, config.bias_init)

    def weights(self) -> kernels.LayerWeights:
        """Both gates' weights stacked, intra rows first ([D, D]), and the stream bias as one row per modality
        ([M, D], intra channels first): one matmul and one lookup compute both gates."""
        base = super().weights()
        stacked = self.stacked_gates()
        if stacked is not None:
            base.gate, base.table = stacked
        return base

    def forward(self, x, modality_ids, return_details: bool = False, cache: KVCache | None = None, valid=None):
        layout = self._inputs(x, modality_ids, valid)
        if not return_details:
            return self.fast_forward(x, layout, cache)
        o, probs = self.attend(x, layout, cache)                          # [B, S, D], intra heads first
        o_intra, o_global = o.split([self.config.intra_dim, self.config.global_dim], dim=-1)
        g_intra, g_global = self.gate(INTRA, x, layout.ids), self.gate(GLOBAL, x, layout.ids)
        gated = torch.cat([o_intra if g_intra is None else g_intra * o_intra,
                           o_global if g_global is None else g_global * o_global], dim=-1)
        return self.o_proj(gated), AttentionDetails(o_intra, o_global, g_intra, g_global, probs)


__all__ = ["AttentionConfig", "AttentionDetails", "StandardAttention", "GatedAttention", "SigmaAttention", "StreamGates",
           "KVCache", "DEFAULT_BIAS_INIT", "INTRA", "GLOBAL", "STREAM_NAMES", "TEXT", "IMAGE"]
