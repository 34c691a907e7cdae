"""Run-time switches in one place: fast mode and the device.

Fast mode shrinks every expensive step (training steps, benchmark sizes, seeds) so each notebook runs in
well under 90 s on a 2-core CPU. It is on when SIGMA_FAST=1 or CI is set. Every notebook and command asks
`fast_mode()`; nothing else in the package reads these variables.
"""

from __future__ import annotations

import os

import torch

_TRUE = {"1", "true", "yes", "on"}


def fast_mode() -> bool:
    """True when SIGMA_FAST is set to 1/true/yes/on, or CI is set to anything non-empty but 0/false."""
    if os.environ.get("SIGMA_FAST", "").strip().lower() in _TRUE:
        return True
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in {"", "0", "false", "no", "off"}


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def course_preset() -> str:
    """The training preset the notebooks use: "ci" in fast mode, else "gpu" with CUDA, else "cpu"."""
    if fast_mode():
        return "ci"
    return "gpu" if torch.cuda.is_available() else "cpu"


def course_seeds() -> list[int]:
    """Seeds the notebooks train and probe: one in fast mode, three otherwise (results vary with the seed)."""
    return [0] if fast_mode() else [0, 1, 2]


def runs_dir(preset: str):
    """Where trained models of a preset live: runs/<preset> in the repository, shared by notebooks and CLI."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "runs" / preset
