"""Test doubles: stand-ins that let a CPU prove code written for hardware it does not have.

    from sigma_ref.testing import flash_double     # flash-attn 2.8's functions in pure PyTorch (doubles.py)
    from sigma_ref.testing.hf import hf_flash_double   # a transformers model's flash route with that double
                                                       # (hf.py; imports transformers, so not imported here)
"""

from .doubles import flash_double

__all__ = ["flash_double"]
