"""What SIGMA costs inside a Hugging Face model: forward + backward of a tiny LLaVA, original vs sigmafied.

    python -m sigma_ref.hf.bench --lengths 2048 8192 --repeats 5 --out results/hf

Both models are the same tiny LLaVA (toy.tiny_llava, the same weights), one converted with sigmafy. A sequence
is made of blocks of 48 text tokens and one 16-token image, so a quarter of it is image. The two models are
timed in ONE process, interleaved (original, converted, original, ...), and the report gives each one's median
and the ratio of medians: on a shared machine only side-by-side figures mean anything. Peak memory is the
growth of the resident set (CPU) or of torch's allocation (CUDA) during one forward + backward, each model
in a fresh process (its growth during the step: the weights and the batch are not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .. import data as D
from ..checks import check_int
from ..lab.bench import cpu_peak_growth_bytes
from . import toy
from .convert import sigmafy

BLOCK_TEXT = 48


def long_batch(length: int, seed: int = 0) -> dict:
    """One sequence of `length` tokens: blocks of 48 text tokens and 16 image tokens, and its images."""
    check_int("length", length, low=BLOCK_TEXT + D.NUM_PATCHES)
    block = BLOCK_TEXT + D.NUM_PATCHES
    blocks, rest = divmod(length, block)
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(len(D.SPECIAL_TOKENS), len(D.VOCAB), (length,), generator=generator)
    ids = text.clone()
    for b in range(blocks):
        ids[b * block + BLOCK_TEXT:(b + 1) * block] = D.IMAGE_TOKEN
    ids = ids[None]                                                       # [1, length]
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.rand(blocks, 3, D.IMAGE_SIZE, D.IMAGE_SIZE, generator=generator)}


def make_model(converted: bool, device: str):
    model = toy.tiny_llava(seed=0).to(device)
    return sigmafy(model) if converted else model


def step(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(length: int, repeats: int, device: str) -> dict:
    """Interleaved forward + backward times (seconds) of the original and the converted model."""
    batch = {k: v.to(device) for k, v in long_batch(length).items()}
    models = {"original": make_model(False, device), "sigma": make_model(True, device)}
    times = {name: [] for name in models}
    for name, model in models.items():                                   # warm-up, not timed
        step(model, batch)
    for _ in range(repeats):
        for name, model in models.items():
            _sync(device)
            start = time.perf_counter()
            step(model, batch)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"length": length, "repeats": repeats, "seconds": times, "median_seconds": medians,
            "time_ratio": medians["sigma"] / medians["original"]}


def peak_memory(length: int, device: str) -> dict:
    """Peak memory growth (MiB) of one forward + backward: activations, gradients and temporaries; the weights
    and the batch exist before and are not counted. On CPU each model runs in a fresh process, with malloc
    settings that make the resident size follow the live tensors (lab/bench.py explains them)."""
    peaks = {}
    for name, converted in (("original", False), ("sigma", True)):
        if device == "cuda":
            batch = {k: v.to(device) for k, v in long_batch(length).items()}
            model = make_model(converted, device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(model, batch)
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            del model, batch
            continue
        setup = (f"from sigma_ref.hf import bench\nbatch = bench.long_batch({length})\n"
                 f"model = bench.make_model({converted}, 'cpu')")
        peaks[name] = cpu_peak_growth_bytes(setup, "bench.step(model, batch)") / 2 ** 20
    return {"peak_mib": peaks, "memory_ratio": peaks["sigma"] / peaks["original"],
            "measure": "growth of torch.cuda.max_memory_allocated" if device == "cuda"
            else "growth of the peak resident set (VmHWM)"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/hf")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for length in args.lengths:
        row = time_pair(length, args.repeats, args.device) | peak_memory(length, args.device)
        rows.append(row)
        print(f"{length:>6} tokens  original {row['median_seconds']['original']:.3f} s  sigma "
              f"{row['median_seconds']['sigma']:.3f} s  time x{row['time_ratio']:.2f}  peak "
              f"{row['peak_mib']['original']:.0f} / {row['peak_mib']['sigma']:.0f} MiB  memory "
              f"x{row['memory_ratio']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu, 1 thread"
    (out / f"bench_{args.device}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
