"""Benchmarks: is SIGMA's attention cheaper than standard causal attention? Measured, not assumed.

Why it can be: SIGMA's intra heads attend only within a modality. With half the tokens image, each intra
head sees two causal sequences of N/2 instead of one of N: half the work. Half the heads are intra, so the
FLOP floor is 0.75x standard causal attention. A kernel only gets there if it SKIPS the cross-modal blocks:
a dense boolean mask makes SDPA compute every block and then throw the masked ones away (ratio > 1), while
the `packed` kernel gathers each modality into its own segment and never computes them. Beside the real
thing the tables time lower bounds (lower_bounds.py): the same work with an overhead taken away.
- "causal SDPA on the packed shapes": packing's attention work with nothing gathered. Its gap to 0.75x is the
  kernel's (a causal kernel computes whole tiles on the diagonal, a larger share of a shorter sequence); the
  gap between it and "SIGMA packed" is packing's own work (gathers, scatters, copies) and the way it runs its
  backward (a few heads at a time, which at some lengths is itself faster).
- "SigmaAttention module, packing free": SIGMA's exact function where packing is a view (text then image,
  each one contiguous half); what the module would cost if gathering cost nothing.
- "standard + the gate's arithmetic": a standard training step plus the bare matmul, sigmoid and product of
  one elementwise gate per layer; no gated step (Gated Attention's or SIGMA's) can cost less.

    python -m sigma_ref bench [--out FILE.json] [--sizes 512 2048 4096 8192] [--repeats 7]
    python -m sigma_ref bench --crossover      # packed vs dense sdpa at short lengths (sets "auto")
    python -m sigma_ref bench --train-step     # the tiny model's training step, SIGMA vs standard

Every ratio is the median over interleaved rounds of a time over its reference's time in the same round, on
the same inputs: this machine is shared and noisy, and only side-by-side ratios are meaningful. The dense
mask and FlexAttention, which allocate and free up to gigabytes per call, are timed in rounds of their own
(with standard causal SDPA again as their reference), so they do not disturb the other kernels. Memory is the
growth of the peak resident size during one forward+backward (inputs made before it and not counted; outputs,
gradients and temporaries counted), the median of three fresh processes with glibc's mmap threshold fixed so
that the resident size follows the live tensors (CPU), or torch.cuda.max_memory_allocated (CUDA).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from tqdm.auto import tqdm

from .. import kernels
from ..attention import AttentionConfig
from ..model import ATTENTIONS, make_attention
from ..data import DataStream
from .lower_bounds import (FREE_PACKING_MODULE, GATE_ARITHMETIC, PACKED_SHAPES, free_packing_forward, gate_arithmetic_case,
                     half_image_layout, packed_shapes)
from ..runtime import machine_description
from ..train import Trainer, get_preset

BENCH_HEADS, BENCH_HEAD_DIM = 8, 64
DEFAULT_SIZES = (512, 2048, 4096, 8192)


def interleaved_times(fns: dict, repeats: int, warmup: int = 1, sync=lambda: None) -> dict[str, list[float]]:
    """Wall times of each function, `repeats` rounds timed round-robin: A B C, A B C, ...

    On a shared machine the background load drifts over seconds. Timing A fully, then B, then C lets that
    drift land on one candidate; interleaving spreads it over all of them, and each round times every
    candidate within a few seconds of the others.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a whole number of rounds, at least 1, got {repeats!r}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1, sync=lambda: None) -> dict[str, float]:
    """Median wall time of each function over `repeats` interleaved rounds (interleaved_times)."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats, warmup, sync).items()}


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """The median over rounds of name's time over reference's time IN THE SAME ROUND: a burst of load that
    slows one round moves both times of that round, and the median drops the rounds it hit unevenly."""
    return statistics.median(t / r for t, r in zip(times[name], times[reference]))


# ---------------------------------------------------------------------------------------------------
# What is measured: each case is a function (n, device, dtype) -> a zero-argument callable to time.
# ---------------------------------------------------------------------------------------------------


def _qkv(n, device, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    # Made as [B, S, H, d] and viewed as [B, H, S, d], exactly as the attention modules produce them.
    return [torch.randn(1, n, BENCH_HEADS, BENCH_HEAD_DIM, generator=g).to(device, dtype).transpose(1, 2)
            .requires_grad_(requires_grad) for _ in range(3)]


# Every row the attention tables can hold, by a stable key (what results files, report.py and the tests use):
# the label a reader sees, the key of the row its ratio divides by, and what it runs (SIGMA's attention through
# a backend, or an attention module of a kind). Meaning is read from here, never from a label.
@dataclass(frozen=True)
class Row:
    label: str
    reference: str
    backend: str | None = None
    module: str | None = None


ROWS = {
    "causal_sdpa": Row("standard causal SDPA", "causal_sdpa"),
    "sigma_sdpa": Row("SIGMA sdpa (dense mask)", "causal_sdpa", backend="sdpa"),
    "sigma_packed": Row("SIGMA packed", "causal_sdpa", backend="packed"),
    "packed_shapes": Row(PACKED_SHAPES, "causal_sdpa"),
    "sigma_flex": Row("SIGMA flex", "causal_sdpa", backend="flex"),
    "flash_causal": Row("flash causal (all heads)", "flash_causal"),
    "sigma_flash": Row("SIGMA flash", "flash_causal", backend="flash"),
    "standard_module": Row("StandardAttention module", "standard_module", module="standard"),
    "gated_module": Row("GatedAttention module", "standard_module", module="gated"),
    "sigma_module": Row("SigmaAttention module", "standard_module", module="sigma"),
    "sigma_module_packing_free": Row(FREE_PACKING_MODULE, "standard_module", module="sigma"),
}
MODULE_ROWS = ("standard_module", "gated_module", "sigma_module", "sigma_module_packing_free")


def case(key: str, n: int, device, dtype, backward: bool):
    """A callable running the row `key` of ROWS at length n (a kernel, or a module)."""
    if key == "sigma_module_packing_free":             # SIGMA's function with packing free (on its own layout)
        return module_case("sigma", n, device, dtype, backward, lambda module, x, ids: free_packing_forward(module, x))
    if ROWS[key].module is not None:
        return module_case(ROWS[key].module, n, device, dtype, backward)
    return kernel_case(key, n, device, dtype, backward)


def kernel_case(key: str, n: int, device, dtype, backward: bool):
    """A callable running one kernel on B=1, H=8, d=64, half image; `key` (of ROWS) picks the kernel."""
    q, k, v = _qkv(n, device, dtype, backward)
    ids = half_image_layout(n)[None].to(device)
    if key == "packed_shapes":
        calls = packed_shapes(q, k, v, n, backward)
        run_all = lambda: [torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True) for qkv in calls]
        if not backward:
            def forward():
                with torch.no_grad():
                    run_all()
            return forward
        grads = [torch.randn_like(qkv[0]) for qkv in calls]
        inputs = [t for qkv in calls for t in qkv]
        return lambda: torch.autograd.grad(run_all(), inputs, grads)
    if key == "causal_sdpa":
        run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif key == "flash_causal":
        impl = kernels.flash.implementation(device.type)
        # flash-attn works on [B, S, H, d]; transpose in and out so every case returns [B, H, S, d].
        run = lambda: impl.func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    else:
        backend = ROWS[key].backend
        run = lambda: kernels.sigma_attention(q, k, v, ids, BENCH_HEADS // 2, backend=backend)[0]
    if not backward:
        def forward():
            with torch.no_grad():
                run()
        return forward
    grad = torch.randn(1, BENCH_HEADS, n, BENCH_HEAD_DIM, device=device, dtype=dtype)

    return lambda: torch.autograd.grad(run(), (q, k, v), grad)


def module_config() -> AttentionConfig:
    """The benchmarked modules' configuration: D = 8 * 64 = 512, half the heads intra, backend "auto"."""
    return AttentionConfig(hidden_size=BENCH_HEADS * BENCH_HEAD_DIM, num_heads=BENCH_HEADS, backend="auto")


def module_case(kind: str, n: int, device, dtype, backward: bool, call=None):
    """A callable running a full attention module (projections and gates included), D = 8 * 64 = 512;
    `call(module, x, ids)` instead of module(x, ids) where given (a floor computing the module's function)."""
    torch.manual_seed(0)
    config = module_config()
    module = make_attention(kind, config).to(device, dtype)
    x = torch.randn(1, n, config.hidden_size, device=device, dtype=dtype, requires_grad=backward)
    ids = half_image_layout(n).to(device)
    run = lambda: module(x, ids) if call is None else call(module, x, ids)
    if not backward:
        def forward():
            with torch.no_grad():
                run()
        return forward
    return lambda: run().sum().backward()


def reference_for(key: str) -> str:
    """What a row's ratio divides by: like with like, measured in the same run."""
    return ROWS[key].reference


def available_kernels(device, dtype) -> list[str]:
    keys = ["causal_sdpa", "sigma_sdpa", "sigma_packed", "packed_shapes", "sigma_flex"]
    probe = torch.zeros(1, 1, 1, BENCH_HEAD_DIM, device=device, dtype=dtype)
    if kernels.flash_available(probe):
        keys += ["flash_causal", "sigma_flash"]
    return keys


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A results table: rows for the reader, and beside them each row's stable key (a ROWS key, an attention
    kind, or a length) for code that reads the results back."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    keys: list = field(default_factory=list)

    def add(self, key, row: list) -> None:
        self.keys.append(key)
        self.rows.append(row)

    def as_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "keys": self.keys, "rows": self.rows}

    def markdown(self) -> str:
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def timing_table(sizes, device, dtype, repeats, progress=True) -> Table:
    """Median ms and ratio to standard causal SDPA, forward and forward+backward, kernels then modules."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    keys = available_kernels(device, dtype)
    table = Table(f"Attention time, {device.type} {str(dtype).replace('torch.', '')}, B=1 H=8 d=64, half image "
                  "(median ms; ratio: the median over rounds of the time over its reference's in the same round, "
                  "the reference being standard causal SDPA for kernels, flash causal for SIGMA flash, the "
                  "StandardAttention module for modules)",
                  ["N", "what", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio"])
    # Three round-robin groups, each holding its reference: the dense mask and FlexAttention allocate and free
    # up to gigabytes per call, which would disturb whatever ran after them in a round; modules with modules.
    slow = ["sigma_sdpa", "sigma_flex"]
    groups = [[key for key in keys if key not in slow], ["causal_sdpa", *slow], list(MODULE_ROWS)]
    jobs = [(n, backward) for n in sizes for backward in (False, True)]
    rows = {(n, key): [n, ROWS[key].label, None, None, None, None] for n in sizes for key in keys + list(MODULE_ROWS)}
    for n, backward in tqdm(jobs, desc=f"bench {device.type}", disable=not progress):
        col = 4 if backward else 2
        for group in groups:
            fns = {key: case(key, n, device, dtype, backward) for key in group
                   if not (key == "sigma_flex" and backward and device.type == "cpu")}   # no backward on CPU
            times = interleaved_times(fns, repeats, sync=sync)
            for key in times:
                if rows[n, key][col] is None:               # the reference's row: from the first group
                    rows[n, key][col] = statistics.median(times[key]) * 1e3
                    rows[n, key][col + 1] = median_ratio(times, key, reference_for(key))
            del fns, times
    for (n, key), row in rows.items():
        table.add(key, row)
    return table


# glibc's malloc serves big blocks with mmap and returns them on free, but raises that threshold after the first
# big free (up to 32 MiB), after which blocks come from a heap whose freed memory stays resident and is reused:
# the resident size then depends on what ran before. A fixed threshold turns that off, so every tensor of 64 KiB
# or more is mapped when allocated and unmapped when freed, and the peak resident size follows the live tensors.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

_PEAK_SCRIPT = """
import torch
torch.set_num_threads({threads})
def status_kib(field):  # a field of /proc/self/status, in KiB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
{setup}
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the current resident size
    f.write("5")
{measured}
print((status_kib("VmHWM") - before) * 1024)
"""


def cpu_peak_growth_bytes(setup: str, measured: str, threads: int = 1) -> int:
    """How far the peak resident size (VmHWM) rises above the resident size while `measured` runs, in a fresh
    Python process that first runs `setup` (so what setup builds, inputs and weights, is not counted). Both
    are Python source; the process uses `threads` torch threads and the malloc settings above (Linux only)."""
    script = _PEAK_SCRIPT.format(threads=threads, setup=setup, measured=measured)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, **_MALLOC_ENV})
    return int(out.stdout.strip().splitlines()[-1])


def peak_memory_bytes(key: str, n: int, device, repeats: int = 3) -> int:
    """Peak memory growth during one forward+backward (outputs, gradients and every temporary; the inputs and
    the module's weights exist before and are not counted), the median of `repeats` fresh processes on CPU."""
    if device.type == "cuda":
        run = case(key, n, device, torch.bfloat16, True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    setup = ("from sigma_ref.lab import bench\n"          # the inputs (and the module) exist after setup
             f"fn = bench.case({key!r}, {n}, torch.device('cpu'), torch.float32, True)")
    runs = [cpu_peak_growth_bytes(setup, "fn()", torch.get_num_threads()) for _ in range(repeats)]
    return int(statistics.median(runs))


def memory_table(sizes, device, progress=True) -> Table:
    keys = ["causal_sdpa", "sigma_sdpa", "sigma_packed", "standard_module", "sigma_module"]
    if device.type == "cuda" and "sigma_flash" in available_kernels(device, torch.bfloat16):
        keys.insert(3, "sigma_flash")
    table = Table(f"Peak memory growth during one forward+backward, inputs not counted, {device.type} "
                  "(MiB, median of 3 fresh processes; ratio to standard causal SDPA for "
                  "kernels, to the StandardAttention module for modules)", ["N", "what", "peak MiB", "ratio"])
    for n in tqdm(sizes, desc="memory", disable=not progress):
        measured = {key: peak_memory_bytes(key, n, device) for key in keys}
        for key in keys:
            table.add(key, [n, ROWS[key].label, measured[key] / 2**20, measured[key] / measured[reference_for(key)]])
    return table


def crossover_table(sizes=(64, 128, 256, 384, 512, 1024), repeats=20, progress=True) -> Table:
    """packed vs dense-mask sdpa for the intra heads at short lengths: where does packing start to pay?"""
    table = Table("Crossover: SIGMA packed vs SIGMA dense-mask sdpa, fwd+bwd, CPU fp32 (median ms; ratio per round, "
                  "median)",
                  ["N", "sdpa ms", "packed ms", "packed / sdpa"])
    device = torch.device("cpu")
    for n in tqdm(sizes, desc="crossover", disable=not progress):
        t = interleaved_times({key: kernel_case(key, n, device, torch.float32, True)
                               for key in ("sigma_sdpa", "sigma_packed")}, repeats, warmup=3)
        table.add(n, [n, statistics.median(t["sigma_sdpa"]) * 1e3, statistics.median(t["sigma_packed"]) * 1e3,
                      median_ratio(t, "sigma_packed", "sigma_sdpa")])
    return table


def training_step_table(progress: bool = True, preset: str = "cpu", repeats: int = 50):
    """Median training-step time of the tiny model for each attention (auto backend), ratio to standard."""
    config = get_preset(preset)
    table = Table(f"Tiny-model training step, preset {preset} (D={config.model.hidden_size}, "
                  f"L={config.model.num_layers}, H={config.model.num_heads}, batch {config.batch_size}), median ms, timed round-robin, ratio per round",
                  ["attention", "step ms", "ratio"])
    batch = DataStream(config.batch_size, 0, config.text_only_fraction).next()
    steps = {}
    for attention in tqdm(ATTENTIONS, desc="train step", disable=not progress):
        trainer = Trainer(attention, config, 0, device="cpu")
        steps[attention] = lambda trainer=trainer: trainer.train_step(batch)
    # The floor of any elementwise gate (Gated Attention's and SIGMA's): a standard step (its own trainer) and
    # the gate's bare arithmetic on the step's shapes, nothing else.
    trainer, rows = Trainer("standard", config, 0, device="cpu"), batch["tokens"].numel()
    gate = gate_arithmetic_case(rows, config.model.hidden_size, config.model.num_layers)
    steps["gate_arithmetic"] = lambda: (trainer.train_step(batch), gate())
    times = interleaved_times(steps, repeats, warmup=3)
    for key, t in times.items():
        label = GATE_ARITHMETIC if key == "gate_arithmetic" else key
        table.add(key, [label, statistics.median(t) * 1e3, median_ratio(times, key, "standard")])
    return table


def run(sizes=DEFAULT_SIZES, repeats=7, memory=True, crossover=False, train_step=False, progress=True) -> dict:
    """Run the benchmark tables and return them with the machine description; print as they finish."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tables = []

    def add(table):
        tables.append(table)
        print(table.markdown() + "\n", flush=True)

    print(f"machine: {machine_description()}\n")
    if crossover:
        add(crossover_table(progress=progress))
    if train_step:
        add(training_step_table(progress=progress))
    if sizes:
        add(timing_table(sizes, device, torch.float32, repeats, progress))
        if device.type == "cuda":
            add(timing_table(list(sizes) + [16384], device, torch.bfloat16, repeats, progress))
        if memory:
            add(memory_table(sizes, device, progress))
    return {"machine": machine_description(),
            "tables": [t.as_dict() for t in tables]}


def save(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
