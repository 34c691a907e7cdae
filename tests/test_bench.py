"""The benchmark's cases measure what their names say (the timings themselves are benchmarks, not tests)."""

import statistics

import pytest
import torch

import sigma_ref as sr
from sigma_ref.lab import bench
from sigma_ref.lab import lower_bounds
from sigma_ref.kernels import packed
from sigma_ref.model import ATTENTIONS


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
    alone = lower_bounds.packed_shapes(q, k, v, n, False)
    assert sorted(shape for shape, _ in made) == sorted(tuple(call[0].shape) for call in alone)
    global_heads = next(call[0] for call in alone if call[0].shape[0] == 1)
    assert (tuple(global_heads.shape), global_heads.stride()) in made


def test_packed_shapes_run_forward_and_backward():
    for backward in (False, True):
        bench.kernel_case("packed_shapes", 64, torch.device("cpu"), torch.float32, backward)()


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
    assert all(bench.reference_for(key) in group for group in groups for key in group)
    assert not any("sigma_sdpa" in group and ({"sigma_packed", "sigma_module"} & group) for group in groups)
    assert all(row[2] is not None and row[4] is not None for key, row in zip(table.keys, table.rows)
               if key != "sigma_flex")
    assert [row[1] for row in table.rows] == [bench.ROWS[key].label for key in table.keys]


@pytest.mark.parametrize("n, split, gates", [(64, 4, True), (130, 4, True), (40, 2, True), (32, 8, True),
                                             (64, 4, False)])
def test_free_packing_floor_is_sigma_on_the_halves_layout(n, split, gates):
    """The module floor computes SigmaAttention's own function (values and every gradient); only the packing
    is replaced by views, which the halves layout allows."""
    torch.manual_seed(n)
    config = sr.AttentionConfig(hidden_size=64, num_heads=8, num_intra_heads=split, use_gates=gates,
                                bias_init=((0.5, -1.0), (1.5, 0.25)), backend="math")
    module = sr.SigmaAttention(config)
    if gates:
        with torch.no_grad():
            module.stream_bias.add_(0.1 * torch.randn_like(module.stream_bias))
    x = torch.randn(1, n, 64, requires_grad=True)
    grad = torch.randn(1, n, 64)
    wanted = module(x, lower_bounds.halves_layout(n))
    got = lower_bounds.free_packing_forward(module, x)
    torch.testing.assert_close(got, wanted, atol=1e-5, rtol=1e-5)
    inputs = [x, *module.parameters()]
    for g_got, g_wanted in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(wanted, inputs, grad)):
        torch.testing.assert_close(g_got, g_wanted, atol=1e-5, rtol=1e-5)


def test_free_packing_floor_says_what_it_needs():
    module = sr.SigmaAttention(sr.AttentionConfig(hidden_size=16, num_heads=2))
    with pytest.raises(ValueError, match=r"x must have shape \[1, n, 16\] with n even, got \[1, 7, 16\]"):
        lower_bounds.free_packing_forward(module, torch.randn(1, 7, 16))


def test_gate_arithmetic_floor_is_a_gates_forward_and_backward(monkeypatch):
    """Per layer the floor differentiates o * sigmoid(h W^T) with respect to h, o and W: nothing more."""
    seen = []
    monkeypatch.setattr(torch.autograd, "grad", lambda out, inputs, grad: seen.append((out, inputs, grad)))
    lower_bounds.gate_arithmetic_case(rows=6, hidden_size=4, num_layers=3)()
    assert len(seen) == 3
    for out, (h, o, weight), grad in seen:
        torch.testing.assert_close(out, o * torch.sigmoid(h @ weight.t()))
        assert h.shape == o.shape == grad.shape == (6, 4) and weight.shape == (4, 4)


def test_training_step_table_times_the_gate_floor_beside_every_attention(monkeypatch):
    once = lambda fns, repeats, **kwargs: {name: [(fn(), 1.0)[1]] for name, fn in fns.items()}   # each runs
    monkeypatch.setattr(bench, "interleaved_times", once)
    table = bench.training_step_table(progress=False, repeats=1)
    assert [row[0] for row in table.rows] == [*ATTENTIONS, lower_bounds.GATE_ARITHMETIC]


@pytest.mark.parametrize("repeats", [0, -2, 1.5])
def test_a_benchmark_needs_at_least_one_round(repeats):
    with pytest.raises(ValueError, match=r"repeats must be .* at least 1, got"):
        bench.interleaved_times({"noop": lambda: None}, repeats)


def test_peak_growth_counts_what_the_measured_code_allocates_and_not_the_setup():
    # setup's 64 MiB exist before the measurement; the measured code allocates and touches 32 MiB more
    setup = "kept = torch.ones(16 * 2 ** 20)"
    grown = bench.cpu_peak_growth_bytes(setup, "extra = torch.ones(8 * 2 ** 20)")
    idle = bench.cpu_peak_growth_bytes(setup, "pass")
    assert 32 * 2 ** 20 <= grown < 40 * 2 ** 20
    assert idle < 4 * 2 ** 20
