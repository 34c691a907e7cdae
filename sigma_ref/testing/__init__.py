"""Test doubles: stand-ins that let a CPU prove code written for hardware it does not have.

    from sigma_ref.testing import flash_double     # flash-attn 2.8's functions in pure PyTorch (doubles.py)
"""

from .doubles import flash_double

__all__ = ["flash_double"]
