"""What SIGMA costs inside a Hugging Face model: forward + backward of a tiny LLaVA, original vs sigmafied.

    python -m sigma_ref.hf.bench --lengths 2048 8192 --repeats 5 --out results/hf

Both models are the same tiny LLaVA (toy.tiny_llava, the same weights), one converted with sigmafy. A sequence
is made of blocks of 48 text tokens and one 16-token image, so a quarter of it is image. The two models are
timed in ONE process, interleaved (original, converted, original, ...), and the report gives each one's median
and the ratio of medians: on a shared machine only side-by-side figures mean anything. Peak memory is the
largest resident set (CPU) or torch's peak allocation (CUDA) during one forward + backward, each model measured
in a fresh child process so that neither inherits the other's peak.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch

from .. import data as D
from ..checks import check_int
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


def _peak_in_child(converted: bool, length: int, device: str, queue) -> None:
    torch.set_num_threads(1)
    batch = {k: v.to(device) for k, v in long_batch(length).items()}
    model = make_model(converted, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(model, batch)
        queue.put(torch.cuda.max_memory_allocated() / 2 ** 20)
    else:
        step(model, batch)
        queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)       # KiB -> MiB


def peak_memory(length: int, device: str) -> dict:
    """Peak memory (MiB) of one forward + backward, each model in a fresh child process."""
    peaks = {}
    context = multiprocessing.get_context("spawn")
    for name, converted in (("original", False), ("sigma", True)):
        queue = context.Queue()
        child = context.Process(target=_peak_in_child, args=(converted, length, device, queue))
        child.start()
        peaks[name] = queue.get()
        child.join()
    return {"peak_mib": peaks, "memory_ratio": peaks["sigma"] / peaks["original"],
            "measure": "max_memory_allocated" if device == "cuda" else "max resident set size of the process"}


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
