"""SIGMA in Hugging Face transformers models (the optional extra: `pip install -e '.[hf]'`).

    sigmafy(model, num_intra_heads=None, ...)    convert a Llama / Qwen2 / Qwen3 / Mistral decoder or a LLaVA
                                                 model in place, for the eager, sdpa, flex_attention and
                                                 flash-attention kernels (convert.py explains how it plugs in)
    from_pretrained(cls, path, **kwargs)         reload a model saved after sigmafy (save_pretrained as usual)
    toy                                          the course's captioning set as a tokenizer, a dataset and a
                                                 tiny LLaVA, for transformers.Trainer (toy.py)

`import sigma_ref` does not import this subpackage (nor transformers).

SAVING AND LOADING. `model.save_pretrained(path)` writes the gates with the other weights and the conversion
settings in config.json (`"sigma": {...}`). A plain `Cls.from_pretrained(path)` builds the unconverted
model and drops the gates; `sigma_ref.hf.from_pretrained(Cls, path)` builds it, converts it with the saved
settings and loads the gates back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from .convert import KERNEL, MASKABLE, sigma_attention, sigmafy


def from_pretrained(cls, path, **kwargs):
    """`cls.from_pretrained(path, **kwargs)` for a model saved after `sigmafy`: converted with its saved
    settings, gates loaded. `path` is a local directory written by save_pretrained."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"path must be a directory written by save_pretrained, got {str(path)!r} (no config.json)")
    settings = json.loads(config_file.read_text()).get("sigma")
    if settings is None:
        raise ValueError(f"path {str(path)!r} holds a model that was not converted (config.json has no 'sigma'); "
                         "load it with from_pretrained and convert it with sigmafy")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()                  # the gates are reported as unexpected keys: they are loaded below
    try:
        model = cls.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.sigma = None
    sigmafy(model, **settings)
    # save_pretrained may write a model's keys in an older layout (LLaVA's "language_model.model.layers..." for
    # "model.language_model.layers..."); the SIGMA parameters live in the one decoder stack, so the part of
    # the name from "layers." on identifies each.
    within_stack = lambda name: name[name.index("layers."):]
    saved = {within_stack(name): t for name, t in _saved_tensors(path).items() if ".sigma." in name}
    own = {name: t for name, t in model.state_dict().items() if ".sigma." in name}
    missing = sorted(name for name in own if within_stack(name) not in saved)
    if missing:
        raise ValueError(f"path {str(path)!r} lacks {len(missing)} SIGMA parameters, e.g. {missing[0]}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved[within_stack(name)])
    return model


def _saved_tensors(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(path / name))
    return tensors


__all__ = ["sigmafy", "from_pretrained", "sigma_attention", "KERNEL", "MASKABLE"]
