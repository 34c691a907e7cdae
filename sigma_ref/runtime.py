"""Run-time switches and file helpers in one place: fast mode, the device, where runs live, atomic writes,
and the description of the machine that measured a number.

Fast mode shrinks the expensive steps of the notebooks (fewer seeds, smaller benchmark sizes), never the
recipe: a model trained in fast mode has learned the task like any other. It is decided here and nowhere
else: SIGMA_FAST=1 turns it on, SIGMA_FAST=0 turns it off (even under CI), and with SIGMA_FAST unset it
follows CI (set by CI services). The notebooks ask
`fast_mode()` through `course_preset()` and `course_seeds()`; the command-line tools take explicit flags.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from .checks import check_int

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def fast_mode() -> bool:
    """SIGMA_FAST=1/true/yes/on: on; SIGMA_FAST=0/false/no/off: off; unset or empty: on when CI is set (not 0/false)."""
    explicit = os.environ.get("SIGMA_FAST", "").strip().lower()
    if explicit in _TRUE:
        return True
    if explicit in _FALSE:
        return False
    if explicit:
        raise ValueError(f"SIGMA_FAST must be one of 1/true/yes/on or 0/false/no/off, got {explicit!r}")
    return os.environ.get("CI", "").strip().lower() not in {""} | _FALSE


# THREAD POLICY. A training process uses one thread, and several models train side by side in separate
# processes, one per core (experiments.ensure_trained). Why: a second thread helps only while the other core is
# idle (speedrun.thread_table measures it), while torch's threads spin-wait for each other and collapse
# when another program takes a core: on a busy 2-core machine a step took 40x longer with 2 threads than with 1.
# One thread per process never waits for a thread that is not running, and two processes use both cores
# when both are free (idle_cores: with one taken, one process is faster).
TRAINING_THREADS = 1


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(idle, total) CPU time since boot and the CPU count, from /proc/stat; None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    times = [int(v) for v in lines[0].split()[1:]]               # user nice system idle iowait irq softirq ...
    return times[3] + times[4], sum(times[:8]), sum(line.startswith("cpu") and line[3].isdigit() for line in lines)


def idle_cores(interval: float = 0.25) -> int:
    """Cores that other programs leave free right now: the idle share of the CPU time over `interval` seconds,
    times the CPU count, rounded (at least 1, at most cpu_cores()). Where /proc/stat is missing: cpu_cores().

    Why: with another program holding one of two cores, two training processes share one core and lose to one
    (two fast-mode models: 77 s in two processes against 68 s in one, measured side by side here)."""
    first = _cpu_jiffies()
    if first is None:
        return cpu_cores()
    time.sleep(interval)
    second = _cpu_jiffies()
    idle, total = second[0] - first[0], second[1] - first[1]
    free = round(idle / total * second[2]) if total > 0 else second[2]
    return max(1, min(cpu_cores(), free))


@contextmanager
def torch_threads(count: int):
    """Run a block with torch using `count` threads, then restore the previous number."""
    check_int("torch_threads: count", count, low=1)
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def course_preset() -> str:
    """The training preset the notebooks use: "gpu" with CUDA, else "cpu". Fast mode trains the same models
    (the course has one kind of model, one that has learned the task), only fewer seeds."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def course_seeds() -> list[int]:
    """Seeds the notebooks train and probe: one in fast mode, three otherwise (results vary with the seed)."""
    return [0] if fast_mode() else [0, 1, 2]


def runs_dir(preset: str) -> Path:
    """Where trained models of a preset live, shared by notebooks and the command line.

    SIGMA_RUNS_DIR/<preset> if that variable is set; in a source checkout <repository>/runs/<preset>; after a
    plain `pip install`, ./runs/<preset> under the current directory.
    """
    if os.environ.get("SIGMA_RUNS_DIR"):
        return Path(os.environ["SIGMA_RUNS_DIR"]) / preset
    checkout = Path(__file__).resolve().parents[1]
    base = checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()
    return base / "runs" / preset


def write_atomic(path: str | Path, content: str | Callable) -> None:
    """Write a file so that readers see the old or the new content, never half of it.

    `content` is text, or a function that writes into an open binary file (e.g. lambda f: torch.save(x, f)).
    The data goes to a temporary file beside `path`, is flushed to disk, then renamed over `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def machine_description() -> dict:
    """The facts a measured number needs beside it: torch, Python, threads, CPU model, GPU."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
