"""TinyMLLM: a small multimodal decoder in the LLaVA mould, with a pluggable attention layer.

    text tokens ─ token embedding + text position ─┐
                                                    ├─ + modality embedding ─> [pre-norm blocks] x L ─> LM head
    image patches ─ linear patch embedding + 2-D ──┘     (attention: standard | gated | sigma | moda)
                    (row, column) position

One sequence = prompt text, image patches, caption (see data.py). The blocks are ordinary pre-norm
transformer blocks; only the attention changes between the models, so any difference in what they
learn comes from the attention. Text positions count text tokens only and patches carry their (row, col),
so inserting image tokens never shifts a text token's position (data.py explains why).

`generate()` decodes greedily with a KV cache; the cache keeps each position's modality, so SIGMA's intra
heads stay within a modality while decoding, and the result equals recomputing the whole sequence
(tests/test_model.py checks both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_bool, check_choice, check_int
from .attention import AttentionConfig, GatedAttention, KVCache, SigmaAttention, StandardAttention, prepare_layout
from .moda import ModaAttention
from .masks import IMAGE, NUM_MODALITIES, TEXT


# The attention kinds, listed once: the command line, the experiments and the notebooks read this.
ATTENTIONS = {"standard": StandardAttention, "gated": GatedAttention, "sigma": SigmaAttention, "moda": ModaAttention}


def make_attention(kind: str, config: AttentionConfig) -> nn.Module:
    """The attention layer named `kind` (a key of ATTENTIONS)."""
    return ATTENTIONS[check_choice("attention", kind, ATTENTIONS)](config)


@dataclass
class ModelConfig:
    """A TinyMLLM: its attention (the kind, and the options every block's layer gets), its sizes, and its
    tokenizer's facts. Each option is declared once: the attention's own live in `attn`, an AttentionConfig.

    The model knows no vocabulary: `vocab_size` and the special token ids come in here, so the same model
    serves any tokenizer. For the course's toy set:
        ModelConfig(attention="sigma", attn=AttentionConfig(hidden_size=64, num_heads=4), num_layers=2,
                    **sigma_ref.data.model_fields())
    `config.updated(num_layers=3, use_gates=False)` changes fields of either level by name.
    """

    attention: str = "sigma"                 # a key of ATTENTIONS: "standard", "gated", "sigma" or "moda"
    attn: AttentionConfig = field(default_factory=AttentionConfig)   # width, heads, SIGMA's and the gate's options
    num_layers: int = 4
    intra_heads_per_layer: tuple | None = None   # SIGMA: one split per layer (e.g. (2, 0)); None: attn's everywhere
    precision: str = "float32"               # or "bfloat16": every forward runs under bf16 autocast (any device)
    mlp_ratio: int = 4
    max_text_positions: int = 64
    vocab_size: int | None = None            # the tokenizer's: required
    pad_id: int | None = None                # right padding in a batch
    eos_id: int | None = None                # generate() stops a row here
    answer_id: int | None = None             # every prompt given to generate() ends with it
    ignore_index: int = -100                 # target value the loss skips
    patch_dim: int = 192                     # flattened image patch (3 x 8 x 8, channels first)
    patch_encoder: str = "linear"            # "linear" projection, or "conv": a 3x3 convolution and GELU first
    grid: int = 4                            # patches per image side: patch positions are (row, column)

    def __post_init__(self):
        check_choice("ModelConfig.attention", self.attention, ATTENTIONS)
        if isinstance(self.attn, dict):
            self.attn = AttentionConfig(**self.attn)                    # read back from a checkpoint or JSON
        if not isinstance(self.attn, AttentionConfig):
            raise ValueError(f"ModelConfig.attn must be an AttentionConfig, got {type(self.attn).__name__}")
        for name in ("num_layers", "mlp_ratio", "max_text_positions", "patch_dim", "grid"):
            check_int(f"ModelConfig.{name}", getattr(self, name), low=1)
        check_choice("ModelConfig.patch_encoder", self.patch_encoder, PATCH_ENCODERS)
        for name in ("vocab_size", "pad_id", "eos_id", "answer_id"):
            check_int(f"ModelConfig.{name}", getattr(self, name), low=1 if name == "vocab_size" else 0,
                      why="from your tokenizer (the toy set's: ModelConfig(..., **sigma_ref.data.model_fields()))")
        if self.intra_heads_per_layer is not None:
            self.intra_heads_per_layer = tuple(self.intra_heads_per_layer)    # a JSON list reads back as a tuple
            if len(self.intra_heads_per_layer) != self.num_layers:
                raise ValueError(f"ModelConfig.intra_heads_per_layer needs one value per layer ({self.num_layers}), "
                                 f"got {self.intra_heads_per_layer!r}")
            for layer in range(self.num_layers):
                self.attention_config(layer)                            # each layer's split is a valid config
        check_choice("ModelConfig.precision", self.precision, PRECISIONS)
        for name in ("pad_id", "eos_id", "answer_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)} is not below vocab_size = {self.vocab_size}")

    @property
    def hidden_size(self) -> int:
        return self.attn.hidden_size

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    def attention_config(self, layer: int = 0) -> AttentionConfig:
        """The AttentionConfig of block `layer`: a copy of `attn` (each layer owns its own), with that layer's
        split when it is set per layer."""
        if self.intra_heads_per_layer is None:
            return replace(self.attn)
        return replace(self.attn, num_intra_heads=self.intra_heads_per_layer[layer])

    def updated(self, **changes) -> ModelConfig:
        """A copy with `changes` applied, each to the level that declares it (this config or `attn`).
        A per-layer split given as `num_intra_heads=(2, 0)` sets intra_heads_per_layer; a new `num_heads`
        without a `num_intra_heads` goes back to the default split (half the heads)."""
        own, attn = {}, {}
        for name, value in changes.items():
            if name == "num_intra_heads" and isinstance(value, (tuple, list)):
                own["intra_heads_per_layer"] = tuple(value)
            elif name in MODEL_FIELDS:
                own[name] = value
            elif name in ATTENTION_FIELDS:
                attn[name] = value
            else:
                raise ValueError(f"{name!r} is not an option of ModelConfig or AttentionConfig; "
                                 f"expected one of {sorted(MODEL_FIELDS | ATTENTION_FIELDS)}")
        if "num_intra_heads" in attn:
            own.setdefault("intra_heads_per_layer", None)           # one split for every layer again
        elif "num_heads" in attn:
            attn["num_intra_heads"] = None                          # a new head count: the default split (half)
        return replace(self, attn=replace(own.pop("attn", self.attn), **attn), **own)

    @classmethod
    def from_dict(cls, fields: dict) -> ModelConfig:
        """A ModelConfig from `dataclasses.asdict` of one, as a checkpoint or metrics.json holds it. Also reads
        the flat form written before the attention's options moved into `attn` (hidden_size, num_heads, ...
        beside num_layers, and num_intra_heads as a tuple for a per-layer split)."""
        fields = dict(fields)
        if "attn" not in fields:
            flat = {name: fields.pop(name) for name in list(fields) if name in ATTENTION_FIELDS}
            if isinstance(flat.get("num_intra_heads"), (list, tuple)):
                fields["intra_heads_per_layer"] = tuple(flat.pop("num_intra_heads"))
            fields["attn"] = flat
        return cls(**fields)


MODEL_FIELDS = frozenset(f.name for f in fields(ModelConfig))
ATTENTION_FIELDS = frozenset(f.name for f in fields(AttentionConfig))


PRECISIONS = ("float32", "bfloat16")
PATCH_ENCODERS = ("linear", "conv")
PATCH_CHANNELS = 16                          # feature maps of the "conv" patch encoder


def patch_encoder(kind: str, patch_dim: int, hidden_size: int) -> nn.Module:
    """[..., patch_dim] flattened RGB patches -> [..., hidden_size].

    linear  one matrix, as in ViT and LLaVA's projector: each output is a weighted sum of pixels.
    conv    a 3x3 convolution (16 maps) and GELU inside each patch, then the projection: edges and corners
            before the transformer, which is what telling a diamond from a square needs. It stands in for
            the pretrained vision encoder a real MLLM has; the patches stay separate tokens as before.
    """
    if kind == "linear":
        return nn.Linear(patch_dim, hidden_size)
    if kind != "conv":
        raise ValueError(f"ModelConfig.patch_encoder must be one of {PATCH_ENCODERS}, got {kind!r}")
    side = math.isqrt(patch_dim // 3)
    if 3 * side * side != patch_dim:
        raise ValueError(f"patch_encoder='conv' needs patch_dim = 3 x side x side, got patch_dim={patch_dim}")
    return nn.Sequential(nn.Unflatten(-1, (3, side, side)),                  # [N, 3, side, side]
                         nn.Conv2d(3, PATCH_CHANNELS, 3, padding=1), nn.GELU(),
                         nn.Flatten(-3),                                      # [N, 16 * side * side]
                         nn.Linear(PATCH_CHANNELS * side * side, hidden_size))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.hidden_size)
        self.attn = make_attention(config.attention, config.attention_config(layer))
        self.norm_mlp = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.mlp_ratio * config.hidden_size), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * config.hidden_size, config.hidden_size))

    def forward(self, x, modality_ids, return_details=False, cache=None):
        out = self.attn(self.norm_attn(x), modality_ids, return_details=return_details, cache=cache)
        attn_out, details = out if return_details else (out, None)
        x = x + attn_out
        x = x + self.mlp(self.norm_mlp(x))
        return x, details


@dataclass
class ModelOutput:
    logits: torch.Tensor                     # [B, S, vocab]
    loss: torch.Tensor | None = None         # mean cross-entropy over caption targets
    hidden_states: list = field(default_factory=list)   # residual stream before block l, and after the last
    details: list = field(default_factory=list)         # AttentionDetails per layer (return_details=True)


class TinyMLLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, H)
        self.text_position = nn.Embedding(config.max_text_positions, H)
        self.patch_embedding = patch_encoder(config.patch_encoder, config.patch_dim, H)
        self.patch_row = nn.Embedding(config.grid, H)
        self.patch_col = nn.Embedding(config.grid, H)
        self.modality_embedding = nn.Embedding(NUM_MODALITIES, H)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.norm = nn.LayerNorm(H)
        self.lm_head = nn.Linear(H, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight          # tied, as in GPT-2 and nanoGPT
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, batch: dict) -> torch.Tensor:
        """[B, S] ids and [B, S, patch_dim] patches -> [B, S, H] input embeddings."""
        if batch["text_position"].max() >= self.config.max_text_positions:
            raise ValueError(f"text_position reaches {int(batch['text_position'].max())}; the model has "
                             f"max_text_positions={self.config.max_text_positions}")
        text = self.token_embedding(batch["tokens"]) + self.text_position(batch["text_position"])
        is_image = batch["modality"] == IMAGE                                          # [B, S]
        row, col = batch["patch_index"] // self.config.grid, batch["patch_index"] % self.config.grid
        image = self.patch_row(row) + self.patch_col(col)                             # [B, S, H]
        # Encode the patches at image positions only ([N, patch_dim] -> [N, H]); text positions hold none.
        image = image.index_put((is_image,), self.encode_patches(batch["patches"][is_image]) + image[is_image])
        return torch.where(is_image[..., None], image, text) + self.modality_embedding(batch["modality"])

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, patch_dim] -> [N, H]: the patch encoder, run once for all background patches.

        A patch with no object in it is all zeros, and every such patch encodes to the same vector; in the toy
        set more than half of the patches are background. So the encoder runs on the patches with content and
        ONE zero patch, and the background positions share its output (in the backward pass their gradients
        are summed into it, which is the same gradient). Same function, about half the encoder's work.
        """
        content = (patches != 0).any(-1)                                           # [N]
        if content.all():
            return self.patch_embedding(patches)
        distinct = torch.cat([patches.new_zeros(1, patches.shape[-1]), patches[content]])   # [1 + n_content, patch_dim]
        row = content.cumsum(0) * content               # content patch -> its row in `distinct`; background -> 0
        return self.patch_embedding(distinct)[row]                                  # [N, H]

    def real_tokens(self, batch: dict) -> torch.Tensor:
        """[B, S] bool, False at right padding: `batch["valid"]` when given, else the pad tokens that have no
        real token after them. generate() passes "valid", since a `<pad>` the model generates is a real token."""
        if "valid" in batch:
            return batch["valid"]
        not_pad = batch["tokens"] != self.config.pad_id
        return not_pad.flip(-1).cumsum(-1).flip(-1) > 0

    def forward(self, batch: dict, return_details: bool = False, caches: list | None = None) -> ModelOutput:
        # THE PRECISION POLICY, in one place: a bfloat16 model computes every forward under bf16 autocast, in
        # training, validation, the probes, evaluate and generate alike, on CUDA and on CPU. (The flash kernels
        # accept only fp16/bf16; a policy that covered only the training step crashed at the first evaluation.)
        if self.config.precision == "bfloat16":
            with torch.autocast(batch["tokens"].device.type, dtype=torch.bfloat16):
                return self._forward(batch, return_details, caches)
        return self._forward(batch, return_details, caches)

    def _forward(self, batch: dict, return_details: bool, caches: list | None) -> ModelOutput:
        x = self.embed(batch)
        # One layout per forward: the modality ids are checked once here, and every layer shares the masks or
        # packing plan derived from them. Padding (right only) is skipped by the packing kernels.
        layout = prepare_layout(batch["modality"], x, self.real_tokens(batch))
        hidden, details = [], []
        for i, block in enumerate(self.blocks):
            hidden.append(x)
            x, d = block(x, layout, return_details, None if caches is None else caches[i])
            details.append(d)
        hidden.append(x)
        logits = self.lm_head(self.norm(x))
        loss = None
        if "targets" in batch:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                   ignore_index=self.config.ignore_index)
        return ModelOutput(logits, loss, hidden if return_details else [], details if return_details else [])

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 16, use_cache: bool = True) -> list[list[int]]:
        """Greedy captions for a batch of prompts that all end with the answer token at the same length.

        Returns the generated token ids of each row, up to and excluding the end-of-sequence token.
        """
        check_int("generate: max_new_tokens", max_new_tokens, low=0)
        check_bool("generate: use_cache", use_cache)
        if not isinstance(batch, dict) or not isinstance(batch.get("tokens"), torch.Tensor) or batch["tokens"].dim() != 2:
            raise ValueError("generate: batch must be a dict with 'tokens' [batch, seq] (and the other collate() fields)")
        eos = self.config.eos_id
        prompt_len = batch["tokens"].shape[1]
        if not (batch["tokens"][:, -1] == self.config.answer_id).all():
            raise ValueError("generate: every prompt must end with the answer token (same length, no padding); "
                             "group prompts by length first (evaluate.evaluate does)")
        fields = ("tokens", "modality", "patch_index", "text_position", "patches", "valid")
        seq = {k: batch[k] for k in fields[:-1]}
        seq["valid"] = torch.ones_like(seq["tokens"], dtype=torch.bool)     # prompts and generated tokens alike
        caches = [KVCache() for _ in self.blocks] if use_cache else None
        step_input = seq
        finished = torch.zeros(len(seq["tokens"]), dtype=torch.bool, device=seq["tokens"].device)
        for _ in range(max_new_tokens):
            logits = self(step_input, caches=caches).logits[:, -1]
            next_token = logits.argmax(-1)                                   # [B]
            finished |= next_token == eos
            new = {"tokens": next_token[:, None], "modality": torch.full_like(next_token[:, None], TEXT),
                   "patch_index": torch.zeros_like(next_token[:, None]),
                   "text_position": seq["text_position"][:, -1:] + 1,
                   "patches": seq["patches"].new_zeros(len(next_token), 1, seq["patches"].shape[-1]),
                   "valid": torch.ones_like(next_token[:, None], dtype=torch.bool)}
            seq = {k: torch.cat([seq[k], new[k]], dim=1) for k in fields}
            step_input = new if use_cache else seq
            if finished.all():
                break
        return [row[:row.index(eos)] if eos in row else row for row in seq["tokens"][:, prompt_len:].tolist()]
