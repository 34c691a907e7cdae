"""The benchmark's cases measure what their names say (the timings themselves are benchmarks, not tests)."""

import statistics

import pytest
import torch

import sigma_ref as sr
from sigma_ref import bench
from sigma_ref.kernels import packed


@pytest.mark.parametrize("n", [64, 66, 131])
def test_packed_shapes_are_the_calls_packed_sigma_makes(n, monkeypatch):
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
    alone = bench._packed_shapes(q, k, v, n, False)
    assert sorted(shape for shape, _ in made) == sorted(tuple(call[0].shape) for call in alone)
    global_heads = next(call[0] for call in alone if call[0].shape[0] == 1)
    assert (tuple(global_heads.shape), global_heads.stride()) in made


def test_packed_shapes_run_forward_and_backward():
    for backward in (False, True):
        bench.kernel_case(bench.PACKED_SHAPES, 64, torch.device("cpu"), torch.float32, backward)()


def test_ratios_pair_each_round_with_its_reference():
    """A burst of load that slows one round slows both of its times: the per-round ratio stays, the median of
    the ratios ignores the round it hit unevenly, and the ratio of the medians would not."""
    times = {"kernel": [1.0, 4.0, 0.5, 6.0, 3.0], "reference": [2.0, 8.0, 1.0, 1.0, 6.0]}
    assert bench.median_ratio(times, "kernel", "reference") == 0.5
    assert statistics.median(times["kernel"]) / statistics.median(times["reference"]) == 1.5
    assert bench.median_ratio(times, "reference", "reference") == 1.0


def test_every_round_holds_its_reference_and_the_dense_mask_runs_apart(monkeypatch):
    """Each timed group holds the reference its rows divide by; the dense mask (gigabytes allocated and freed
    per call at long lengths) is never in a round with the packed kernels or the modules."""
    groups = []
    timed = bench.interleaved_times

    def recording(fns, repeats, **kwargs):
        groups.append(set(fns))
        return timed(fns, 1, **kwargs)

    monkeypatch.setattr(bench, "interleaved_times", recording)
    table = bench.timing_table([64], torch.device("cpu"), torch.float32, repeats=1, progress=False)
    assert all(bench.reference_for(name) in group for group in groups for name in group)
    assert not any("SIGMA sdpa (dense mask)" in group and ({"SIGMA packed", "SigmaAttention module"} & group)
                   for group in groups)
    assert all(row[2] is not None and row[4] is not None for row in table.rows if row[1] != "SIGMA flex")


@pytest.mark.parametrize("repeats", [0, -2, 1.5])
def test_a_benchmark_needs_at_least_one_round(repeats):
    with pytest.raises(ValueError, match=r"repeats must be .* at least 1, got"):
        bench.interleaved_times({"noop": lambda: None}, repeats)
