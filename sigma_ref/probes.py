"""Latte measurements: what stays pure, what mixes, and where the gates open. Each returns plain numbers."""

from __future__ import annotations

import torch

from .masks import IMAGE, TEXT

MODALITIES = {"text": TEXT, "image": IMAGE}


@torch.no_grad()
def gate_means(model, batch: dict) -> list[dict]:
    """Mean gate value per layer, stream and modality: [{"intra": {"text": .., "image": ..}, "global": {..}}, ..].

    Streams without a gate are left out (standard attention: every layer is {}). Padding is excluded.
    """
    model.eval()
    out = model(batch, return_details=True)
    real = batch["targets"] != -100
    real |= batch["tokens"] != 0          # every non-pad token
    layers = []
    for details in out.details:
        layer = {}
        for stream, gate in (("intra", details.g_intra), ("global", details.g_global)):
            if gate is None:
                continue
            layer[stream] = {name: gate[(batch["modality"] == m) & real].mean().item()
                             for name, m in MODALITIES.items() if ((batch["modality"] == m) & real).any()}
        layers.append(layer)
    return layers
