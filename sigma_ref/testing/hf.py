"""`hf_flash_double(config)`: a transformers model's flash-attention route, run on CPU with flash_double.

    from sigma_ref.testing.hf import hf_flash_double
    with hf_flash_double(model.config):            # LLaVA: model.config.text_config
        logits = model(input_ids, attention_mask=mask).logits     # transformers' flash code, the double's kernel

transformers refuses `attn_implementation="flash_attention_2"` where flash-attn is not installed, and its flash
code imports the kernel lazily. Inside the block the config names "flash_attention_2" (set directly, past that
check) and transformers' lazy import returns flash_double's functions with its own padding helpers, so
everything above the kernel (the padding mask, unpadding, the varlen arguments, the kwargs it passes) is
transformers' code as a GPU runs it. flash_double enforces flash-attn's dtypes: run the model in bf16 or fp16.
Only what is patched is restored on exit; this module imports transformers, the `hf` extra.
"""

from __future__ import annotations

import contextlib

import transformers.modeling_flash_attention_utils as flash_utils

from .doubles import flash_double

__all__ = ["hf_flash_double"]


def _double_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
    """transformers' `_lazy_imports`, answered by the double: (func, varlen_func, kvcache_func, pad, unpad)."""
    return (flash_double.flash_attn_func, flash_double.flash_attn_varlen_func, flash_double.flash_attn_with_kvcache,
            flash_utils._pad_input, flash_utils._unpad_input)


@contextlib.contextmanager
def hf_flash_double(config, implementation: str = "flash_attention_2"):
    """Inside the block, the model whose (language model's) config is `config` runs `implementation` through
    transformers' flash-attention code with flash_double as the kernel, on CPU tensors."""
    if "flash" not in implementation:
        raise ValueError(f"implementation must name a flash-attention kernel (contain 'flash'), got {implementation!r}")
    previous = config._attn_implementation_internal
    lazy_imports = flash_utils._lazy_imports
    flash_utils._lazy_imports = _double_imports
    flash_utils._loaded_implementation = None            # the next flash call imports again: the double
    config._attn_implementation_internal = implementation
    try:
        yield flash_double
    finally:
        config._attn_implementation_internal = previous
        flash_utils._lazy_imports = lazy_imports
        flash_utils._loaded_implementation = None
