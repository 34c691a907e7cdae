"""The benchmark's cases measure what their names say (the timings themselves are benchmarks, not tests)."""

import pytest
import torch

import sigma_ref as sr
from sigma_ref import bench
from sigma_ref.kernels import packed


@pytest.mark.parametrize("n", [64, 66, 131])
def test_flash_calls_alone_are_the_calls_packed_sigma_makes(n, monkeypatch):
    """The floor row times the causal attention calls that packed SIGMA makes on the half-image layout: the
    same shapes and, for the global heads, the same (strided) views of the inputs."""
    made = []
    flash = packed._FLASH_CPU

    def recording(q, k, v, *args):
        made.append((tuple(q.shape), q.stride()))
        return flash(q, k, v, *args)

    monkeypatch.setattr(packed, "_FLASH_CPU", recording)
    q, k, v = bench._qkv(n, torch.device("cpu"), torch.float32, False)
    ids = bench.half_image_layout(n)[None]
    sr.kernels.sigma_attention(q, k, v, ids, bench.BENCH_HEADS // 2, backend="packed")
    alone = bench._flash_calls_alone(q, k, v, n, False)
    assert sorted(shape for shape, _ in made) == sorted(tuple(call[0].shape) for call in alone)
    global_heads = next(call[0] for call in alone if call[0].shape[0] == 1)
    assert (tuple(global_heads.shape), global_heads.stride()) in made


def test_flash_calls_alone_run_forward_and_backward():
    for backward in (False, True):
        bench.kernel_case(bench.FLASH_CALLS_ALONE, 64, torch.device("cpu"), torch.float32, backward)()
