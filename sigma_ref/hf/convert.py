"""SIGMA inside a Hugging Face model: `sigmafy(model)` converts every self-attention layer in place.

What a converted layer computes is SigmaAttention's function (attention.py), on the model's own projections,
rotary positions, grouped-query heads and cache:

    heads 0..h-1   the INTRA stream: causal AND same modality          (the intra mask)
    heads h..H-1   the GLOBAL stream: the model's own causal mask
    y = o_proj(cat(g_intra * o_intra, g_global * o_global)),  g_s = sigmoid(gate_s_proj(x) + B[s][modality])

HOW IT PLUGS IN. transformers looks an attention function up in a registry by the name in
`config._attn_implementation` ("eager", "sdpa", "flex_attention", ...). A converted layer sees the model's
config through a view (`_SigmaView`) whose implementation name is "sigma_ref"; that name is registered to
`sigma_attention`, which calls the implementation the MODEL names (so `model.set_attn_implementation("eager")`
still chooses the kernel) twice: once on the intra heads with the intra mask, once on the global heads with
the model's mask. The model's own forward is untouched. Two forward pre-hooks carry what the layers need:

    on the language model   the modality of every token (from `input_ids == image_token_id`, or the
                            `modality_ids=` keyword), kept on the cache for the tokens it holds, and the intra
                            mask in the kernel's own format: the model's mask (causal, padding, window) AND same
                            modality (`_intra_mask`);
    on each attention layer its input x, for the gates.

FLASH ATTENTION. The flash kernels take no mask: the intra stream reaches them as packed segments (flash.py).

PACKING. Where it is exact and the model's kernel is sdpa (no cache, right padding only: training and the
prefill of generation), the intra heads skip the mask: causal attention within each modality is causal attention
over that modality's tokens gathered in order, which sigma_ref's packed kernel computes (notebook 05), with no
[S, S] mask and fewer pairs than causal attention. The tests hold both routes to the same values and gradients.

KEY/VALUE GROUPS. With grouped-query attention, H query heads share H_kv key/value heads in groups of
H / H_kv. The split falls on a group boundary (h a multiple of H / H_kv), so every K/V head serves one stream
and each stream is an ordinary grouped-query attention over its own heads.

GATES AT CONVERSION. The gate projections start at zero, so every gate starts at sigmoid(B[s][modality]), one
constant per stream and modality: a converted pretrained model is the original with each stream scaled by a
known factor (0.73 and 0.27 for text under the default bias), which fine-tuning then adjusts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import kernels
from ..attention import DEFAULT_BIAS_INIT, StreamGates, _check_bias_init
from ..checks import check_bool, check_int
from .flash import AsTheModelSees, FlashSegments, flash_intra, flash_segments, is_flash
from ..masks import intra_mask_mod, validate_modality_ids

KERNEL = "sigma_ref"
# The kernels whose masks transformers builds from a mask function, so the intra mask can be expressed. The
# flash-attention kernels (any name with "flash", transformers' own rule) take padding only: the intra stream
# reaches them as packed segments instead (FlashSegments).
MASKABLE = ("eager", "sdpa", "flex_attention")
DECODERS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
LANGUAGE_MODELS = ("LlamaModel", "Qwen2Model", "Qwen3Model", "MistralModel")
MULTIMODAL = ("LlavaForConditionalGeneration",)


class SigmaGates(StreamGates, nn.Module):
    """The parameters SIGMA adds to one converted layer (`self_attn.sigma`): its two gates and stream bias."""

    def __init__(self, input_size: int, head_dim: int, num_heads: int, num_intra_heads: int, settings: dict,
                 window: int | None):
        super().__init__()
        self.num_intra_heads = num_intra_heads
        self.window = window                      # the layer's sliding window (None: full attention)
        self.sliding = window is not None         # which of the model's masks this layer's global stream uses
        widths = (num_intra_heads * head_dim, (num_heads - num_intra_heads) * head_dim)
        self._init_stream_gates(input_size, widths, settings["use_gates"], settings["use_stream_bias"],
                                settings["bias_init"])
        for proj in (self.gate_intra_proj, self.gate_global_proj):
            if proj is not None:
                nn.init.zeros_(proj.weight)       # gates start at sigmoid(B): see the module docstring


@dataclass
class Plan:
    """What every layer of one forward shares: the modality of the new tokens [B, Q], the intra masks (in the
    kernel's format) keyed by whether the layer uses a sliding window, and, where the intra stream can be
    computed by packing (below), the layout of the sequence for sigma_ref's packed kernel, or its segments for
    a flash kernel."""

    modality_ids: torch.Tensor
    intra_masks: dict
    packed_layout: kernels.GroupLayout | None = None
    flash_segments: FlashSegments | None = None


class _SigmaView:
    """The model's config as a converted layer sees it: every attribute is the model's (reads and writes go
    to it), except the attention implementation, which is "sigma_ref"."""

    def __init__(self, config):
        object.__setattr__(self, "_base", config)

    def __getattr__(self, name):
        if name == "_base":                       # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._base, name)

    def __setattr__(self, name, value):
        setattr(self._base, name, value)

    @property
    def _attn_implementation(self) -> str:
        return KERNEL


def sigma_attention(module, query, key, value, attention_mask, sigma_plan=None, sigma_input=None, **kwargs):
    """The registered "sigma_ref" attention function. query [B, H, Q, d], key / value [B, H_kv, K, d] (rotary
    applied, cache included); returns ([B, Q, H, d], weights or None) as every transformers kernel does."""
    if sigma_plan is None or sigma_input is None:
        raise ValueError(f"{type(module).__name__} was converted by sigmafy and must run inside its converted "
                         "model (the model's forward prepares the modality ids and the intra mask)")
    base = module.config._base._attn_implementation
    if base not in MASKABLE and not is_flash(base):
        raise ValueError(f"attn_implementation must be one of {MASKABLE} or a flash-attention kernel for a SIGMA "
                         f"model, got {base!r}")
    kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward") if base == "eager" \
        else ALL_ATTENTION_FUNCTIONS[base]
    gates: SigmaGates = module.sigma
    h, heads = gates.num_intra_heads, query.shape[1]
    group = module.num_key_value_groups
    h_kv = h // group                                              # the split falls on a K/V group boundary
    if is_flash(base):
        module = AsTheModelSees(module)                            # the flash code reads the kernel's name there
        seen, held = sigma_plan.flash_segments.key_length if h else 0, key.shape[2]
        if h and gates.sliding and (seen > gates.window or held < seen):
            # A window shorter than the sequence (or a cache that has dropped tokens) counts positions of the
            # whole sequence, which the intra stream's packed segments no longer have.
            raise ValueError(f"attn_implementation {base!r} with intra heads needs the sequence within the layer's "
                             f"sliding window, got {seen} tokens for a window of {gates.window}; use 'sdpa', 'eager' "
                             "or 'flex_attention', which hold the window in the intra mask")
    parts = []
    if h and is_flash(base):
        parts.append((flash_intra(kernel, module, query[:, :h], key[:, :h_kv], value[:, :h_kv],
                                  sigma_plan.flash_segments, kwargs), None))
    elif h and _packable(module, base, gates, sigma_plan, query, kwargs):
        # Causal attention within each modality = causal attention over each modality's tokens gathered in
        # order: sigma_ref's packed kernel (notebook 05), exact, with no [S, S] mask. [B, h, S, d] -> [B, S, h, d]
        # Under autocast the projections and the rotary positions can leave q, k and v in different dtypes;
        # sdpa casts them itself, the packed kernel takes one: the lowest of them, as autocast would.
        dtype = min((query.dtype, key.dtype, value.dtype), key=lambda t: torch.finfo(t).bits)
        k, v = (t[:, :h_kv].repeat_interleave(group, 1).to(dtype) for t in (key, value))
        out, _ = kernels.grouped_causal_attention(query[:, :h].to(dtype), k, v, sigma_plan.packed_layout,
                                                  backend="packed")
        parts.append((out.transpose(1, 2), None))
    elif h:
        parts.append(kernel(module, query[:, :h], key[:, :h_kv], value[:, :h_kv],
                            sigma_plan.intra_masks[gates.sliding], **kwargs))
    if h < heads:
        parts.append(kernel(module, query[:, h:], key[:, h_kv:], value[:, h_kv:], attention_mask, **kwargs))
    out = torch.cat([o for o, _ in parts], dim=2)                  # [B, Q, H, d], intra heads first
    extras = [w for _, w in parts]
    extra = torch.cat(extras, dim=1) if all(w is not None for w in extras) else None
    stacked = gates.stacked_gates()                                # both gates' weights and bias, or None
    if stacked is not None:                                        # the gate recomputed in the backward pass
        gated = kernels.gated_product(sigma_input, out.flatten(2), *stacked, sigma_plan.modality_ids)
        out = gated.to(out.dtype).view_as(out)                     # [B, Q, H, d]
    return out, extra


def _packable(module, base: str, gates, plan: Plan, query, kwargs) -> bool:
    """May this call compute the intra stream by packing? For sdpa, on a full-attention layer, when the whole
    sequence is new (no cache), padding is on the right only, and the softmax is the plain one (the default
    scale, no dropout); otherwise the intra mask is used."""
    scaling = kwargs.get("scaling")
    return (base == "sdpa" and plan.packed_layout is not None and not gates.sliding
            and (scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-12)
            and not (module.training and getattr(module, "attention_dropout", 0.0)))


AttentionInterface.register(KERNEL, sigma_attention)


def language_model(model) -> nn.Module:
    """The decoder stack (LlamaModel, ...) inside a supported model; a ValueError names what is not supported."""
    name = type(model).__name__
    if name in DECODERS:
        return model.model
    if name in MULTIMODAL:
        inner = model.model.language_model
        if type(inner).__name__ in LANGUAGE_MODELS:
            return inner
        raise ValueError(f"model is a {name} whose language model is a {type(inner).__name__}; sigmafy supports "
                         f"language models {LANGUAGE_MODELS}")
    raise ValueError(f"model must be one of {DECODERS + MULTIMODAL}, got {name}")


def sigmafy(model, num_intra_heads: int | None = None, bias_init=DEFAULT_BIAS_INIT, use_gates: bool = True,
            use_stream_bias: bool = True, image_token_id: int | None = None):
    """Convert every self-attention layer of `model` to SIGMA, in place; returns the model.

    num_intra_heads  query heads 0..h-1 form the intra stream; None = half the key/value groups' heads. With
                     grouped-query attention it must be a multiple of num_attention_heads // num_key_value_heads.
    bias_init, use_gates, use_stream_bias   as in AttentionConfig.
    image_token_id   the token whose positions are image positions; None reads the model's config (LLaVA's
                     image_token_index). Without one, pass `modality_ids=` [B, S] (0 text, 1 image) to forward
                     and generate.
    A model saved after conversion records these settings in `config.sigma`; `from_pretrained` reloads it.
    """
    lm = language_model(model)
    if getattr(model.config, "sigma", None) is not None and getattr(lm, "sigma_settings", None) is not None:
        raise ValueError("model is already converted (model.config.sigma is set); convert the original once")
    config = lm.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    group = heads // kv_heads
    if num_intra_heads is None:
        num_intra_heads = group * (kv_heads // 2)
    check_int("num_intra_heads", num_intra_heads, 0, heads, why=f"(0..num_attention_heads={heads})")
    if num_intra_heads % group:
        raise ValueError(f"num_intra_heads must be a multiple of num_attention_heads // num_key_value_heads = "
                         f"{heads} // {kv_heads} = {group}, so that each key/value head serves one stream; got "
                         f"{num_intra_heads}")
    for name, flag in (("use_gates", use_gates), ("use_stream_bias", use_stream_bias)):
        check_bool(name, flag)
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is not None:
        check_int("image_token_id", image_token_id, 0, config.vocab_size - 1, why=f"(a token id < {config.vocab_size})")
    settings = {"num_intra_heads": num_intra_heads, "bias_init": [list(r) for r in _check_bias_init(bias_init)],
                "use_gates": use_gates, "use_stream_bias": use_stream_bias, "image_token_id": image_token_id}
    settings["needs_modality"] = bool(num_intra_heads) or (use_gates and use_stream_bias)

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sliding_kinds = set()
    for layer in lm.layers:
        attn = layer.self_attn
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        sliding_kinds.add(window is not None)
        weight = attn.q_proj.weight
        attn.sigma = SigmaGates(config.hidden_size, head_dim, heads, num_intra_heads, settings,
                                window).to(device=weight.device, dtype=weight.dtype)
        attn.config = _SigmaView(attn.config)
        attn.register_forward_pre_hook(_pass_layer_input, with_kwargs=True)
    lm.sigma_settings = dict(settings, sliding_kinds=sorted(sliding_kinds))
    lm.register_forward_pre_hook(_prepare_forward, with_kwargs=True)
    if model is not lm:
        model.register_forward_pre_hook(_modality_from_input_ids, with_kwargs=True)
        model.sigma_settings = lm.sigma_settings
    model.prepare_inputs_for_generation = _passing_modality_ids(model.prepare_inputs_for_generation)
    model.config.sigma = {k: v for k, v in settings.items() if k != "needs_modality"}
    return model


# ---------------------------------------------------------------------------------------------------
# The hooks: what a forward (or one generate step) prepares for the converted layers.
# ---------------------------------------------------------------------------------------------------

def _pass_layer_input(attn, args, kwargs):
    """Hand the layer's input x to the attention function (the gates read it) through transformers' kwargs."""
    kwargs["sigma_input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return args, kwargs


def _modality_from_input_ids(model, args, kwargs):
    """On the outer model: LLaVA's language model sees embeddings only, so the image positions are read here."""
    image_token_id = model.sigma_settings["image_token_id"]
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if kwargs.get("modality_ids") is None and image_token_id is not None and input_ids is not None:
        kwargs["modality_ids"] = (input_ids == image_token_id).long()
    return args, kwargs


def _passing_modality_ids(prepare):
    """generate() accepts only keywords that its input preparation names: this one names modality_ids and
    hands them to every step's forward (which reads the new tokens' part, _new_token_ids)."""
    def prepare_inputs_for_generation(*args, modality_ids=None, **kwargs):
        inputs = prepare(*args, **kwargs)
        if modality_ids is not None:
            inputs["modality_ids"] = modality_ids
        return inputs
    return prepare_inputs_for_generation


def _prepare_forward(lm, args, kwargs):
    """On the language model: the modality of the new tokens, the history kept on the cache, the intra masks."""
    settings = lm.sigma_settings
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    batch, q_len = (input_ids if embeds is None else embeds).shape[:2]
    device = (input_ids if embeds is None else embeds).device

    cache_key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
    cache = kwargs.get(cache_key)
    use_cache = kwargs.get("use_cache")
    if cache is None and (lm.config.use_cache if use_cache is None else use_cache):
        cache = kwargs[cache_key] = DynamicCache(config=lm.config)      # what the model makes; made here to hold
    past = cache.get_seq_length() if cache is not None else 0           # the modality of the tokens it caches

    ids = kwargs.pop("modality_ids", None)
    if ids is None and input_ids is not None and settings["image_token_id"] is not None:
        ids = (input_ids == settings["image_token_id"]).long()
    if ids is None:
        if settings["needs_modality"]:
            raise ValueError("modality_ids is missing: this SIGMA model has no image_token_id, so pass "
                             "modality_ids=[batch, seq] (0 text, 1 image) to forward / generate, or convert with "
                             "sigmafy(..., image_token_id=...)")
        ids = torch.zeros(batch, q_len, dtype=torch.long, device=device)
    ids = _new_token_ids(ids, batch, q_len, past).to(device)

    history = getattr(cache, "sigma_modality", None) if past else None
    if past and (history is None or history.shape != (batch, history.shape[1]) or history.shape[1] < past):
        raise ValueError(f"the cache holds {past} tokens whose modality this SIGMA model did not see; start "
                         "generation from an empty cache")
    every = torch.cat([history[:, :past], ids], dim=1) if past else ids  # [B, past + Q]
    if cache is not None:
        cache.sigma_modality = every

    masks, layout, segments = {}, None, None
    if settings["num_intra_heads"] and is_flash(lm.config._attn_implementation):
        segments = flash_segments(every, past, kwargs.get("attention_mask"), kwargs.get("position_ids"),
                                  kwargs.get("cu_seq_lens_q"))
    elif settings["num_intra_heads"]:
        attention_mask = kwargs.get("attention_mask")
        layout = _packed_layout(lm.config, every, past, attention_mask, kwargs.get("position_ids"))
        dtype = embeds.dtype if embeds is not None else lm.get_input_embeddings().weight.dtype
        shape_only = torch.empty(batch, q_len, 0, dtype=dtype, device=device)       # the builders read its shape
        for sliding in settings["sliding_kinds"]:
            if layout is None or sliding:                   # packing covers full-attention layers without a mask
                masks[sliding] = _intra_mask(lm.config, sliding, shape_only, attention_mask, cache,
                                             kwargs.get("position_ids"), every)
    kwargs["sigma_plan"] = Plan(ids, masks, layout, segments)
    return args, kwargs


def _packed_layout(config, every, past: int, attention_mask, position_ids) -> kernels.GroupLayout | None:
    """The sequence's layout for the packed intra stream, or None where packing does not apply: a kernel other
    than sdpa, cached tokens, a padding mask that is not [B, S] right padding, or several sequences packed into
    one row (position ids without an attention mask, which transformers reads as packed sequences)."""
    if config._attn_implementation != "sdpa" or past or (attention_mask is None and position_ids is not None):
        return None
    valid = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return None
        valid = attention_mask.bool()
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):              # a padding position before a real token
            return None
    # Right padding needs no mask: padded positions come after every real token of their group, so causal
    # attention within the group never lets a real token see them.
    return kernels.GroupLayout.of(every, every.shape[0], every.shape[1], every.device, valid, name="modality_ids")


def _intra_mask(config, sliding: bool, shape_only, attention_mask, cache, position_ids, every):
    """The intra stream's mask in the format of the model's kernel: the model's own mask (causal, padding,
    window) AND same modality. Dense masks (eager, sdpa) of full-attention layers are the model's mask with the
    other modality's keys removed, one comparison [B, 1, Q, K]; otherwise transformers' builder evaluates
    sigma_ref's `intra_mask_mod` as an extra condition at every (query, key) (5-10x slower to build, and
    needed where keys do not start at position 0: a sliding-window cache, a FlexAttention block mask)."""
    build = create_sliding_window_causal_mask if sliding else create_causal_mask
    if not sliding and config._attn_implementation in ("eager", "sdpa"):
        allowed = build(config, shape_only, attention_mask, cache, position_ids=position_ids,
                        allow_is_causal_skip=False)          # [B, 1, Q, K]: bool (sdpa) or additive (eager)
        if isinstance(allowed, torch.Tensor) and allowed.dim() == 4:
            q_len, k_len = allowed.shape[-2:]
            keys = torch.zeros(every.shape[0], k_len, dtype=every.dtype, device=every.device)
            keys[:, :min(k_len, every.shape[1])] = every[:, :k_len]          # a static cache's unused slots
            same = every[:, -q_len:, None] == keys[:, None, :]               # [B, Q, K]
            same = same[:, None]                                             # [B, 1, Q, K]
            if allowed.dtype == torch.bool:
                return allowed & same
            return allowed.masked_fill(~same, torch.finfo(allowed.dtype).min)
    return build(config, shape_only, attention_mask, cache, position_ids=position_ids,
                 and_mask_function=intra_mask_mod(every))


def _new_token_ids(ids, batch: int, q_len: int, past: int) -> torch.Tensor:
    """The modality [B, Q] of this forward's Q new tokens. modality_ids may cover exactly the new tokens
    ([B, Q] or [Q]), or the sequence from its first token: all of it ([B, past + Q]) or a prompt that
    generation has since extended, whose later tokens (generated text) count as text."""
    ids = validate_modality_ids(ids, "modality_ids")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0).expand(batch, -1)
    length = ids.shape[-1]
    if ids.dim() != 2 or ids.shape[0] != batch or length > past + q_len:
        raise ValueError(f"modality_ids must have shape [batch, seq] = [{batch}, {q_len}] (the new tokens) or "
                         f"[{batch}, n] with n <= {past + q_len} (the sequence from its first token, cached tokens "
                         f"included), got {list(ids.shape)}")
    if length == q_len:
        return ids
    whole = torch.zeros(batch, past + q_len, dtype=ids.dtype, device=ids.device)      # generated tokens: text
    whole[:, :length] = ids
    return whole[:, past:]
