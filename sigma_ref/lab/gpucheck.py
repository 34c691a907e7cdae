"""The GPU check: everything the course claims about CUDA, measured on the machine at hand.

    python -m sigma_ref gpu-check --out results/gpu

On a CUDA machine it writes results/gpu/gpu_check.json and gpu_check.md (the device named in both):
    1. equivalence: every backend against `math`, bf16, on random layouts that differ per row (padding
       included), forward values and input gradients; and cached decoding through flash against dense decoding;
    2. the benchmark: bf16 attention time up to N=16384, with the flash rows (flash-attn if installed, else
       torch's varlen kernel), and peak memory from torch.cuda.max_memory_allocated;
    3. the `gpu` preset trained for standard, Gated and SIGMA, one seed: caption exact match and time.
Without CUDA it says so and exits non-zero: a GPU figure is never made up from a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import kernels
from .bench import Table, memory_table, timing_table
from .experiments import ensure_trained, summary_table
from ..runtime import machine_description, write_atomic

# bf16 keeps 8 bits of mantissa: outputs of unit-variance attention agree to a few 1e-3; gradients to ~1e-2.
BF16_TOLERANCE = {"out": 2e-2, "grad": 5e-2}
GPU_SIZES = (512, 2048, 4096, 8192, 16384)


def random_layout(batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row modality ids [B, S] (runs of text and image of random lengths) and right padding valid [B, S]."""
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        position, modality = 0, int(torch.randint(0, 2, (1,), generator=generator))
        while position < seq_len:
            run = int(torch.randint(1, max(2, seq_len // 3), (1,), generator=generator))
            ids[b, position:position + run] = modality
            position, modality = position + run, 1 - modality
        valid[b, seq_len - int(torch.randint(0, seq_len // 4 + 1, (1,), generator=generator)):] = False
    return ids, valid


def equivalence_table(device: torch.device, trials: int = 10, progress: bool = True) -> Table:
    """Largest |backend - math| over `trials` random layouts, bf16 inputs, math in fp32 on the same inputs."""
    backends = [b for b in ("sdpa", "packed", "flex", "flash") if b != "flex" or device.type == "cuda"]
    probe = torch.zeros(1, 1, 1, 64, device=device, dtype=torch.bfloat16)
    if not kernels.flash_available(probe):
        backends.remove("flash")
    worst = {b: [0.0, 0.0] for b in backends}
    generator = torch.Generator().manual_seed(0)
    for _ in tqdm(range(trials), desc="equivalence", disable=not progress):
        batch, seq_len = int(torch.randint(1, 4, (1,), generator=generator)), int(torch.randint(8, 200, (1,), generator=generator))
        ids, valid = random_layout(batch, seq_len, generator)
        ids, valid = ids.to(device), valid.to(device)
        q, k, v = (torch.randn(batch, 8, seq_len, 64, generator=generator).to(device, torch.bfloat16) for _ in range(3))
        grad = torch.randn(batch, 8, seq_len, 64, generator=generator).to(device)

        def run(backend, dtype):
            inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out, _ = kernels.sigma_attention(*inputs, ids, 4, backend=backend, valid=valid)
            grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
            return out.detach().float(), [g.float() for g in grads]

        reference, reference_grads = run("math", torch.float32)
        for backend in backends:
            out, grads = run(backend, torch.bfloat16)
            worst[backend][0] = max(worst[backend][0], float((out - reference).abs().max()))
            worst[backend][1] = max(worst[backend][1], max(float((g - r).abs().max()) for g, r in zip(grads, reference_grads)))
        if "flash" in backends:        # cached decoding: the last 3 positions over the whole row, against dense
            decoded = kernels.decode_attention(q[..., -3:, :], k, v, ids, 4, backend="flash").float()
            dense = kernels.reference.dense_decode_attention(q[..., -3:, :].float(), k.float(), v.float(), ids, 4)
            error = float((decoded - dense).abs().max())
            worst.setdefault("flash (cached decoding)", [0.0, 0.0])
            worst["flash (cached decoding)"][0] = max(worst["flash (cached decoding)"][0], error)
    table = Table(f"Every backend against math (fp32 on the same bf16 inputs), SIGMA H=8 (4 intra), d=64, {trials} "
                  f"random per-row layouts with padding, {device.type}", ["backend", "max |out - math|",
                                                                           "max |grad - math|", "within bf16 tolerance"])
    for backend, (out_error, grad_error) in worst.items():
        ok = out_error <= BF16_TOLERANCE["out"] and grad_error <= BF16_TOLERANCE["grad"]
        table.add(backend, [backend, out_error, grad_error, "yes" if ok else "NO"])
    return table


def run_gpu_check(out_dir: str | Path, progress: bool = True) -> dict:
    """All three parts on CUDA; results.json and a markdown report in out_dir. ValueError without CUDA."""
    if not torch.cuda.is_available():
        raise ValueError("gpu-check needs a CUDA device and this machine has none (torch.cuda.is_available() is "
                         "False); nothing was measured")
    device = torch.device("cuda")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = [equivalence_table(device, progress=progress),
              timing_table(GPU_SIZES, device, torch.bfloat16, repeats=10, progress=progress),
              memory_table(GPU_SIZES[:-1], device, progress=progress)]
    runs = ensure_trained("gpu", [0], out_dir / "runs", progress=progress)
    machine = machine_description()
    report = [f"GPU check on {machine.get('gpu')} (torch {machine['torch']}; flash: "
              f"{kernels.flash.implementation('cuda').name if kernels.flash.implementation('cuda') else 'none'})"]
    report += [t.markdown() for t in tables]
    report.append("**The `gpu` preset, seed 0**\n\n" + summary_table(runs))
    write_atomic(out_dir / "gpu_check.md", "\n\n".join(report) + "\n")
    results = {"machine": machine, "tables": [t.as_dict() for t in tables],
               "runs": runs}
    write_atomic(out_dir / "gpu_check.json", json.dumps(results, indent=1))
    print("\n\n".join(report))
    return results
