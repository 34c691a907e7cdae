"""The GPU path, proven on a CPU as far as a CPU can: flash kernels through the flash-attn double (the seam),
one bf16 precision policy for training, validation, probes, evaluate and generate, flash in cached decoding,
and checkpoints that load and resume on any device."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sigma_ref import data as D
from sigma_ref import evaluate as E
from sigma_ref.lab import runs as R
from sigma_ref import kernels, probes
from sigma_ref import train as T
from sigma_ref.attention import KVCache
from sigma_ref.kernels import flash
from sigma_ref.model import ModelConfig, TinyMLLM
from sigma_ref.testing import flash_double

from conftest import tiny_config

# The gpu preset's recipe (bf16, backend "flash") at tiny sizes and a few steps.
TINY_GPU = T.get_preset("gpu").updated(hidden_size=32, num_layers=2, num_heads=4, steps=8, batch_size=6,
                                       warmup_steps=2, eval_every=4, eval_samples=6, checkpoint_every=4, backend="flash")


@pytest.mark.parametrize("flavour", ["flash-attn", "torch varlen_attn"])
@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(2, 24), st.integers(1, 3), st.integers(0, 4), st.data())
def test_flash_decoding_equals_dense_decoding(flavour, batch, cached, new, intra, data):
    """New positions of any modalities (per row) against a cache of any layout, every head split, through
    flash-attn's functions and through torch's varlen_attn."""
    total = cached + new
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=total, max_size=total),
                                          min_size=batch, max_size=batch)))
    g = torch.Generator().manual_seed(total * 10 + batch)
    q = torch.randn(batch, 4, new, 16, generator=g).bfloat16()
    k, v = (torch.randn(batch, 4, total, 16, generator=g).bfloat16() for _ in range(2))
    module = flash_double if flavour == "flash-attn" else flash_double.torch_varlen
    flash_double.calls.clear()
    with flash.substitute(module):
        out = kernels.decode_attention(q, k, v, ids, intra, backend="flash")
    dense = kernels.reference.dense_decode_attention(q.float(), k.float(), v.float(), ids, intra)
    torch.testing.assert_close(out.float(), dense, atol=2e-2, rtol=2e-2)
    if flavour == "flash-attn":
        expected = (["flash_attn_varlen_func"] if intra else []) + (["flash_attn_with_kvcache"] if intra < 4 else [])
    else:
        expected = ["varlen_attn", "flash_attn_varlen_func"] * ((intra > 0) + (intra < 4))
    assert flash_double.calls == expected


def test_cached_generation_through_flash_equals_full_recomputation_and_keeps_the_intra_stream_pure():
    torch.manual_seed(0)
    config = tiny_config("sigma", backend="flash", precision="bfloat16")
    model = TinyMLLM(config).eval()
    prompts = D.collate([E.prompt_of(D.encode(s)) for s in D.load_split("test")[:3] if len(s["objects"]) == 2])
    flash_double.calls.clear()
    with flash.substitute(flash_double):
        cached = model.generate(prompts, max_new_tokens=6, use_cache=True)
        decode_calls = list(flash_double.calls)
        full = model.generate(prompts, max_new_tokens=6, use_cache=False)
    assert cached == full
    assert "flash_attn_with_kvcache" in decode_calls and decode_calls.count("flash_attn_varlen_func") > 2
    # purity while decoding: another image leaves the intra stream of the generated token unchanged (layer 0)
    other = dict(prompts, patches=torch.rand_like(prompts["patches"]) * (prompts["modality"] == 1)[..., None])
    with flash.substitute(flash_double), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = []
        for batch in (prompts, other):
            caches = [KVCache() for _ in model.blocks]
            model(batch, caches=caches)
            step = {k: v[:, -1:] for k, v in batch.items() if k != "targets"}
            details = model(step, caches=caches, return_details=True).details[0]
            outs.append(details.o_intra)
    assert torch.equal(outs[0], outs[1])


def test_the_gpu_recipe_trains_evaluates_checkpoints_and_resumes_through_flash_under_bf16(tmp_path):
    """The `gpu` preset's path end to end on CPU: bf16 autocast everywhere, every attention call through flash."""
    flash_double.calls.clear()
    with flash.substitute(flash_double):
        metrics = R.train_and_evaluate("sigma", "gpu", 0, tmp_path / "run", progress=False, device="cpu",
                                       config=TINY_GPU)
        calls = set(flash_double.calls)
        model = E.load_model(tmp_path / "run" / "checkpoint.pt")
        assert model.config.precision == "bfloat16" and model.config.attn.backend == "flash"
        gates = probes.gate_means(model, probes.probe_batch())
        interrupted = T.Trainer("sigma", TINY_GPU, 0, tmp_path / "again", device="cpu")
        interrupted.run(stop_at=4, progress=False)
        resumed = T.Trainer("sigma", TINY_GPU, 0, tmp_path / "again", device="cpu")
        resumed.load(tmp_path / "again" / "checkpoint.pt")
        resumed.run(progress=False)
    assert calls >= {"flash_attn_varlen_func", "flash_attn_func", "flash_attn_with_kvcache"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == TINY_GPU.steps
    assert 0 <= metrics["caption_exact_match"] <= 1 and all(0 < v < 1 for layer in gates for s in layer.values()
                                                            for v in s.values())
    assert [loss for _, loss in resumed.loss_curve] == [loss for _, loss in metrics["loss_curve"]]


def test_without_the_seam_a_flash_model_on_cpu_says_why_and_load_model_picks_a_cpu_backend(tmp_path):
    with flash.substitute(flash_double):
        T.Trainer("gated", TINY_GPU, 0, tmp_path, device="cpu").run(stop_at=4, progress=False)
    with pytest.warns(UserWarning, match="backend='flash'.*loading it on cpu with backend='auto'"):
        model = E.load_model(tmp_path / "checkpoint.pt")
    batch = D.collate([D.encode(s) for s in D.load_split("validation")[:4]])
    assert torch.isfinite(model(batch).loss)                 # runs here, still under its bf16 policy
    with pytest.raises(ValueError, match="backend='flash'.*needs CUDA"):
        T.Trainer("gated", TINY_GPU, 0, device="cpu").model(batch)


def test_a_float32_model_is_not_touched_by_the_policy_and_a_bad_precision_is_refused():
    model = TinyMLLM(tiny_config(num_layers=1))
    batch = D.collate([D.encode(s) for s in D.load_split("validation")[:2]])
    assert model(batch).logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):      # a caller's own autocast stays in force
        assert model(batch).logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        ModelConfig(precision="fp8", **D.model_fields())


def test_training_draws_no_torch_random_numbers_so_checkpoints_hold_none(tmp_path):
    trainer = T.Trainer("sigma", TINY_GPU.updated(precision="float32", backend="auto"), 0, tmp_path, device="cpu")
    before = torch.get_rng_state()
    trainer.run(stop_at=4, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert not any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in state.values())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("saved_on", DEVICES)
@pytest.mark.parametrize("resumed_on", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: the cross-device case runs on a GPU machine"))])
def test_resume_on_another_device_continues_the_curve(tmp_path, saved_on, resumed_on):
    recipe = TINY_GPU.updated(precision="float32", backend="auto")
    straight = T.Trainer("sigma", recipe, 3, device=resumed_on)
    straight.run(progress=False)
    first = T.Trainer("sigma", recipe, 3, tmp_path, device=saved_on)
    first.run(stop_at=4, progress=False)
    resumed = T.Trainer("sigma", recipe, 3, tmp_path, device=resumed_on)
    resumed.load(tmp_path / "checkpoint.pt")
    resumed.run(progress=False)
    tolerance = 0 if saved_on == resumed_on else 1e-3         # another device computes other roundings
    for (step_a, a), (step_b, b) in zip(straight.loss_curve, resumed.loss_curve):
        assert step_a == step_b and abs(a - b) <= tolerance * max(1.0, abs(a))


def test_gpu_check_refuses_without_cuda_and_creates_nothing(tmp_path):
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu-check would run for real")
    result = subprocess.run([sys.executable, "-m", "sigma_ref", "gpu-check", "--out", str(tmp_path / "gpu")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "needs a CUDA device" in result.stderr
    assert not (tmp_path / "gpu").exists()


def test_gpu_checks_equivalence_table_passes_through_the_double_and_would_catch_a_wrong_kernel(monkeypatch):
    from sigma_ref.lab import gpucheck
    with flash.substitute(flash_double):
        table = gpucheck.equivalence_table(torch.device("cpu"), trials=3, progress=False)
    assert [row[0] for row in table.rows] == ["sdpa", "packed", "flash", "flash (cached decoding)"]
    assert all(row[3] == "yes" for row in table.rows)
    # a kernel that ignores the modality groups (plain causal everywhere) must be flagged
    monkeypatch.setattr(kernels.dispatch, "packed_attention", kernels.packed.causal_attention)
    monkeypatch.setattr(kernels.dispatch, "sigma_packed_attention",
                        lambda q, k, v, layout, _: kernels.packed.causal_attention(q, k, v, layout))
    broken = gpucheck.equivalence_table(torch.device("cpu"), trials=3, progress=False)
    assert dict((row[0], row[3]) for row in broken.rows)["packed"] == "NO"


def test_random_layouts_differ_per_row_and_pad_on_the_right():
    from sigma_ref.lab import gpucheck
    ids, valid = gpucheck.random_layout(4, 60, torch.Generator().manual_seed(1))
    assert len({tuple(row.tolist()) for row in ids}) > 1
    assert not (valid[:, 1:] & ~valid[:, :-1]).any() and valid[:, 0].all()
