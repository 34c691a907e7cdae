"""VAR, Visual Attention Redistribution (Kang et al., ICLR 2025): a training-free edit of a trained model's
attention that takes weight from "sink" tokens and gives it to the rest of the image.

Where SIGMA and MODA change the layer before training, VAR leaves the weights alone and edits attention
probabilities alpha [B, H, S, S] at inference:

1. Sink tokens. A token is a sink when one of a few "massive activation" dimensions dominates its hidden
   state x (the residual stream entering the layer, before its norm):
       phi(x) = max over d in dims of |x[d]| / RMS(x),   RMS(x) = sqrt(mean(x^2) + 1e-6),
   and phi > tau. Since sum_d x[d]^2 = D RMS(x)^2, phi can never exceed sqrt(D): the published tau = 20 was
   set for D = 4096 (sqrt = 64) and cannot fire at the course's D = 64 (sqrt = 8). The same share of the
   state's energy in one coordinate is tau = 20 sqrt(D / 4096) = 2.5 at D = 64 (`equivalent_tau`), where an
   isotropic state already passes it a few percent of the time (`isotropic_exceedance`): a threshold has
   to come from a measured, separated cluster, not from the paper.
2. Which rows change. For query row i (per head): S_i = mass on image tokens, r_i = share of S_i on
   non-sink image tokens. The row is redistributed when S_i >= floor and r_i >= rho.
3. Redistribution. Every sink in the row (text or image) keeps (1 - p) of its weight; the freed mass goes to
   the non-sink image tokens in proportion to their weight. Other entries are unchanged; rows still sum to 1.

Conventions: p and rho are the PAPER's (p = fraction taken from the sinks, rho = least share of the image
mass on non-sink image tokens). The released code (VisAttnSink) uses the complements: its p is the fraction
KEPT (code p = 0.6 is paper p = 0.4) and its test is "sink share <= rho".

`redistributing(model, dims, tau)` applies the edit inside a trained model while it evaluates and generates:
sinks are found at the prefill of each sequence and kept while decoding, as in the released code.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .checks import check_int, check_real
from .masks import IMAGE

PUBLISHED_TAU = 20.0          # the paper's threshold, for LLaMA-2-7B (D = 4096)
PUBLISHED_DIM = 4096


def _check_mask(name: str, mask, batch: int, seq_len: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, seq_len):
        seen = (mask.dtype, list(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor [batch, keys] = [{batch}, {seq_len}], got {seen}")
    return mask


def redistribute(probs: torch.Tensor, is_image: torch.Tensor, is_sink: torch.Tensor, p: float = 0.4,
                 rho: float = 0.5, floor: float = 0.2) -> torch.Tensor:
    """VAR's edit of attention probabilities: probs [B, H, Q, S] (rows over S keys summing to 1, or all 0 at
    padding), is_image and is_sink [B, S] bool over the keys -> edited probs, the same shape.

    A row is edited when its image mass S_i >= floor and the non-sink share of it r_i >= rho; there every sink
    keeps (1 - p) of its weight and the non-sink image tokens share the freed mass in proportion to theirs.
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or not probs.dtype.is_floating_point:
        seen = (probs.dtype, list(probs.shape)) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a float tensor [batch, heads, queries, keys], got {seen}")
    batch, _, _, seq_len = probs.shape
    _check_mask("is_image", is_image, batch, seq_len)
    _check_mask("is_sink", is_sink, batch, seq_len)
    for name, value in (("p", p), ("rho", rho), ("floor", floor)):
        check_real(name, value, low=0, high=1)
    sums = probs.sum(-1)
    if bool((probs < 0).any()) or not bool(((sums - 1).abs() < 1e-4).logical_or(sums.abs() < 1e-6).all()):
        raise ValueError(f"probs must be probabilities: rows >= 0 summing to 1 (or all 0 at padding); row sums "
                         f"seen from {float(sums.min()):.4g} to {float(sums.max()):.4g}")
    return _redistribute(probs, is_image, is_sink, p, rho, floor)


def _redistribute(probs, is_image, is_sink, p, rho, floor):
    """redistribute() without the checks: rows may also sum to less than 1 (MODA's pseudo-logit keeps some)."""
    image = is_image[:, None, None, :].to(probs.dtype)                  # [B, 1, 1, S]
    sink = is_sink[:, None, None, :].to(probs.dtype)
    plain_image = image * (1 - sink)                                    # non-sink image tokens
    image_mass = (probs * image).sum(-1, keepdim=True)                  # S_i [B, H, Q, 1]
    plain_mass = (probs * plain_image).sum(-1, keepdim=True)
    sink_mass = (probs * sink).sum(-1, keepdim=True)
    share = plain_mass / image_mass.clamp_min(1e-12)                    # r_i
    selected = (image_mass >= floor) & (share >= rho) & (plain_mass > 0)
    edited = probs * (1 - p * sink) + (p * sink_mass) * probs * plain_image / plain_mass.clamp_min(1e-12)
    return torch.where(selected, edited, probs)


def sink_values(hidden: torch.Tensor, dims) -> torch.Tensor:
    """phi [...]: max over `dims` of |hidden[..., d]| / RMS(hidden), for hidden [..., D]."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float tensor [..., D], got "
                         f"{(hidden.dtype, list(hidden.shape)) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    dims = list(dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < hidden.shape[-1] for d in dims):
        raise ValueError(f"dims must be a non-empty list of ints in 0..{hidden.shape[-1] - 1}, got {dims!r}")
    rms = (hidden.float().square().mean(-1, keepdim=True) + 1e-6).sqrt()
    return (hidden.float()[..., dims].abs() / rms).amax(-1)


def find_sink_dimensions(hidden: torch.Tensor, count: int = 2, top_fraction: float = 0.01):
    """The `count` dimensions where a few tokens carry far more than usual: ([dims], scores [D]).

    hidden [N, D] (N tokens). z = |h| / RMS(h) per token; a dimension's score is the mean of its top
    `top_fraction` of z over its median z. A dimension of massive activations scores far above the rest.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float tensor [tokens, D], got "
                         f"{(hidden.dtype, list(hidden.shape)) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    check_int("count", count, 1, hidden.shape[-1])
    check_real("top_fraction", top_fraction, low=1e-6, high=1)
    rms = (hidden.float().square().mean(-1, keepdim=True) + 1e-6).sqrt()
    z = hidden.float().abs() / rms                                       # [N, D]
    top = max(1, math.ceil(top_fraction * z.shape[0]))
    scores = z.topk(top, dim=0).values.mean(0) / z.median(0).values.clamp_min(1e-12)
    return scores.topk(count).indices.tolist(), scores


def equivalent_tau(hidden_size: int, tau: float = PUBLISHED_TAU, reference_size: int = PUBLISHED_DIM) -> float:
    """The threshold that asks for the same share of the state's energy in one coordinate as `tau` does at
    `reference_size`: phi^2 / D is that share, so tau scales with sqrt(D). 2.5 at D = 64."""
    check_int("hidden_size", hidden_size, low=1)
    return tau * math.sqrt(hidden_size / reference_size)


def isotropic_exceedance(tau: float, hidden_size: int, num_dims: int = 2, samples: int = 200_000,
                         seed: int = 0) -> float:
    """P(phi > tau) for an isotropic Gaussian state of size D on `num_dims` fixed dimensions (simulated): how
    often a token with no sink at all would pass the threshold."""
    check_int("hidden_size", hidden_size, low=1)
    check_int("num_dims", num_dims, 1, hidden_size)
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(samples, hidden_size, generator=generator)
    return float((sink_values(states, range(num_dims)) > tau).float().mean())


@contextlib.contextmanager
def redistributing(model, dims, tau: float, p: float = 0.4, rho: float = 0.5, floor: float = 0.2, layers=None):
    """Inside the block, `model` (a TinyMLLM) attends with VAR's edit in `layers` (default: every layer).

    A token is a sink when sink_values(x, dims) > tau, x the residual stream entering the layer. Sinks are
    found once per sequence, at its prefill (a forward without a KV cache, or the one that fills it), and
    kept while decoding; tokens decoded later are never sinks. The paper edits layers 2..L-1 only, which
    leaves nothing of a 2-layer model: pass `layers` to choose.
    """
    for name, value in (("p", p), ("rho", rho), ("floor", floor)):
        check_real(name, value, low=0, high=1)
    check_real("tau", tau)
    layers = list(range(len(model.blocks))) if layers is None else list(layers)
    for layer in layers:
        check_int("layers entry", layer, 0, len(model.blocks) - 1)
    keys: dict[int, tuple] = {}                        # layer -> (is_image, is_sink), [B, keys so far]

    def watch(layer):
        def hook(block, args, kwargs):                 # Block.forward(x, modality_ids, return_details, cache)
            x, ids = args[0], args[1]
            ids = getattr(ids, "ids", ids)             # a GroupLayout, or the ids themselves
            cache = args[3] if len(args) > 3 else kwargs.get("cache")
            is_image = ids == IMAGE
            if cache is None or cache.length == 0:     # a prefill: find this sequence's sinks
                keys[layer] = (is_image, sink_values(x, dims) > tau)
            elif layer not in keys:
                raise ValueError("redistributing: a decoding step whose prefill ran outside the block; "
                                 "start generation inside it")
            else:
                image, sink = keys[layer]
                keys[layer] = (torch.cat([image, is_image], 1), torch.cat([sink, torch.zeros_like(is_image)], 1))
        return hook

    def edit(layer):
        return lambda probs: _redistribute(probs, *keys[layer], p, rho, floor)

    handles = []
    try:
        for layer in layers:
            block = model.blocks[layer]
            handles.append(block.register_forward_pre_hook(watch(layer), with_kwargs=True))
            block.attn.probs_edit = edit(layer)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            model.blocks[layer].attn.probs_edit = None


__all__ = ["redistribute", "redistributing", "sink_values", "find_sink_dimensions", "equivalent_tau", "isotropic_exceedance",
           "PUBLISHED_TAU", "PUBLISHED_DIM"]
