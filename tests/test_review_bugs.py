"""One test per bug that the "rebuild the house" review reproduced; each failed on the code before the fix."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sigma_ref as sr
from sigma_ref import data as D
from sigma_ref.lab import experiments as X
from sigma_ref import runtime
from sigma_ref import train as T
from sigma_ref.attention import KVCache
from sigma_ref.model import ModelConfig, TinyMLLM

TINY = T.TrainConfig(hidden_size=32, num_layers=2, num_heads=4, steps=12, batch_size=8, warmup_steps=3,
                     eval_every=4, eval_samples=8, checkpoint_every=4)


def tiny_model(attention="sigma", backend="auto"):
    torch.manual_seed(0)
    return TinyMLLM(ModelConfig(attention=attention, hidden_size=32, num_layers=2, num_heads=4, backend=backend,
                                **D.model_fields())).eval()


# --- inference mode: ids made inside torch.inference_mode() (a serving loop) ------------------------------

@pytest.mark.parametrize("backend", ["auto", "sdpa", "packed", "math"])
def test_sigma_attention_and_model_run_under_inference_mode(backend):
    layer = sr.SigmaAttention(sr.AttentionConfig(hidden_size=32, num_heads=4, backend=backend)).eval()
    model = tiny_model(backend=backend)
    batch = D.collate([D.encode(s) for s in D.load_split("test")[:3]])
    with torch.inference_mode():
        ids = sr.layout("T3 I5 T4")
        y = layer(torch.randn(2, 12, 32), ids)
        logits = model({k: v.clone() for k, v in batch.items()}).logits
    assert y.shape == (2, 12, 32) and torch.isfinite(logits).all()


# --- return_probs is refused by every backend that cannot form the probabilities --------------------------

@pytest.mark.parametrize("backend", ["sdpa", "packed", "flex"])
def test_sigma_attention_refuses_return_probs_like_grouped(backend):
    q = torch.randn(1, 4, 6, 8)
    ids = sr.layout("T2 I2 T2")[None]
    for call in (lambda: sr.sigma_attention(q, q, q, ids, 2, backend=backend, return_probs=True),
                 lambda: sr.grouped_causal_attention(q, q, q, ids, backend=backend, return_probs=True)):
        with pytest.raises(ValueError, match="return_probs=True needs backend='math'"):
            call()


# --- right padding is never packed, and every backend returns zeros there --------------------------------

@given(st.lists(st.integers(1, 20), min_size=1, max_size=3), st.integers(0, 4), st.data())
def test_padding_is_zero_and_backends_agree(lengths, split, data):
    seq_len = max(lengths)
    ids = torch.tensor([data.draw(st.lists(st.integers(0, 1), min_size=seq_len, max_size=seq_len)) for _ in lengths])
    valid = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    q, k, v = torch.randn(3, len(lengths), 4, seq_len, 8).unbind(0)
    reference, _ = sr.sigma_attention(q, k, v, ids, split, backend="math", valid=valid)
    assert torch.all(reference[~valid[:, None, :, None].expand_as(reference)] == 0)
    for backend in ("sdpa", "packed"):
        out, _ = sr.sigma_attention(q, k, v, ids, split, backend=backend, valid=valid)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_valid_must_be_right_padding():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="valid must mark right padding only"):
        sr.sigma_attention(q, q, q, torch.zeros(4, dtype=torch.long), 1, valid=torch.tensor([[True, False, True, True]]))


# --- a checkout reads the repository's data/ (a wheel its own copy: test_architecture) ----------------------

def test_a_checkout_reads_the_top_level_data_folder():
    assert Path(str(D.DATA_DIR)) == Path(sr.__path__[0]).parent / "data"
    assert (D.DATA_DIR / "CARD.md").is_file()


# --- fast mode: one helper, and SIGMA_FAST=0 wins over CI --------------------------------------------------

@pytest.mark.parametrize("sigma_fast, ci, expected", [
    (None, None, False), (None, "true", True), (None, "false", False), (None, "0", False),
    ("1", None, True), ("0", "true", False), ("off", "1", False), ("yes", "false", True), ("", "true", True),
])
def test_fast_mode(monkeypatch, sigma_fast, ci, expected):
    for name, value in (("SIGMA_FAST", sigma_fast), ("CI", ci)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert runtime.fast_mode() is expected
    assert runtime.course_seeds() == ([0] if expected else [0, 1, 2])


def test_fast_mode_rejects_a_typo(monkeypatch):
    monkeypatch.setenv("SIGMA_FAST", "maybe")
    with pytest.raises(ValueError, match="SIGMA_FAST must be one of"):
        runtime.fast_mode()


# --- results files: atomic, and ensure_trained resumes instead of crashing or restarting ---------------------

def test_ensure_trained_resumes_after_a_crash_that_truncated_metrics(tmp_path, monkeypatch):
    monkeypatch.setitem(T.PRESETS, "tiny", TINY)
    straight = X.ensure_trained("tiny", [0], tmp_path / "straight", attentions=["sigma"], progress=False)
    run = X.run_dir(tmp_path / "crashed", "sigma", 0)
    with runtime.torch_threads(runtime.TRAINING_THREADS):       # as ensure_trained trains: the same floats
        T.Trainer("sigma", TINY, 0, run, device="cpu").run(stop_at=8, progress=False)   # checkpoint at step 8
    (run / "metrics.json").write_text('{"attention": "sigma", "preset": "ti')       # a torn write
    loaded = []
    monkeypatch.setattr(T.Trainer, "load", lambda self, path, original=T.Trainer.load: loaded.append(path) or original(self, path))
    resumed = X.ensure_trained("tiny", [0], tmp_path / "crashed", attentions=["sigma"], progress=False)
    assert loaded == [run / "checkpoint.pt"]
    assert resumed["sigma"][0]["loss_curve"] == straight["sigma"][0]["loss_curve"]
    assert json.loads((run / "metrics.json").read_text())["steps"] == TINY.steps


def test_parallel_workers_train_the_same_models_as_one_process(tmp_path, monkeypatch):
    """Two spawned workers (one thread each, the thread policy) give the very same runs as training in turn,
    and a second call reuses them all without training."""
    monkeypatch.setitem(T.PRESETS, "tiny", TINY)
    serial = X.ensure_trained("tiny", [0, 1], tmp_path / "serial", attentions=["gated"], progress=False, workers=1)
    parallel = X.ensure_trained("tiny", [0, 1], tmp_path / "parallel", attentions=["gated"], progress=False, workers=2)
    for one, other in zip(serial["gated"], parallel["gated"]):
        assert one["seed"] == other["seed"] and one["threads"] == other["threads"] == runtime.TRAINING_THREADS
        assert one["loss_curve"] == other["loss_curve"] and one["caption_exact_match"] == other["caption_exact_match"]
    monkeypatch.setattr(X, "train_and_evaluate", lambda **job: pytest.fail(f"retrained {job}"))
    again = X.ensure_trained("tiny", [0, 1], tmp_path / "parallel", attentions=["gated"], progress=False)
    assert [r["loss_curve"] for r in again["gated"]] == [r["loss_curve"] for r in parallel["gated"]]
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        X.ensure_trained("tiny", [2], tmp_path / "serial", attentions=["gated"], workers=0)


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path, monkeypatch):
    T.Trainer("sigma", TINY, 0, tmp_path, device="cpu").run(stop_at=4, progress=False)
    other = T.TrainConfig(**{**TINY.__dict__, "lr": 1e-4})
    with pytest.raises(ValueError, match="another recipe.*'lr'"):
        T.Trainer("sigma", other, 0, device="cpu").load(tmp_path / "checkpoint.pt")
    # ensure_trained sets such a checkpoint aside and starts afresh instead of mixing recipes
    monkeypatch.setitem(T.PRESETS, "tiny", other)
    run = X.run_dir(tmp_path / "runs", "sigma", 0)
    run.mkdir(parents=True)
    (tmp_path / "checkpoint.pt").rename(run / "checkpoint.pt")
    metrics = X.ensure_trained("tiny", [0], tmp_path / "runs", attentions=["sigma"], progress=False)["sigma"][0]
    assert metrics["loss_curve"][0][0] == 1 and (run / "checkpoint.pt.stale").exists()


def test_write_atomic_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "results.json"
    runtime.write_atomic(path, "old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runtime.write_atomic(path, broken)
    assert path.read_text() == "old"


# --- the "ValueError naming the argument" promise -------------------------------------------------------------

def test_x_of_another_dtype_than_the_module():
    layer = sr.SigmaAttention(sr.AttentionConfig(hidden_size=16, num_heads=2))
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the module's parameters are torch.float32"):
        layer(torch.randn(1, 3, 16, dtype=torch.float64), sr.layout("T3"))


def test_kv_cache_of_another_batch():
    layer = sr.SigmaAttention(sr.AttentionConfig(hidden_size=16, num_heads=2)).eval()
    cache = KVCache()
    layer(torch.randn(2, 3, 16), sr.layout("T3"), cache=cache)
    with pytest.raises(ValueError, match="cache holds a batch of 2 rows but this call has 3"):
        layer(torch.randn(3, 1, 16), sr.layout("T1"), cache=cache)


@pytest.mark.parametrize("value", [2.5, -3, "4", True])
def test_generate_max_new_tokens_must_be_a_non_negative_int(value):
    batch = D.collate([D.encode(D.load_split("test")[0])])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        tiny_model().generate(batch, max_new_tokens=value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bias_init_must_be_finite(bad):
    with pytest.raises(ValueError, match="bias_init entry .* must be a finite number"):
        sr.AttentionConfig(bias_init=((1.0, bad), (-1.0, 0.0)))


def test_model_config_needs_the_tokenizer_facts():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1 from your tokenizer"):
        ModelConfig(attention="sigma")
    config = ModelConfig(vocab_size=100, pad_id=0, eos_id=1, answer_id=2)    # any vocabulary, not the toy one
    assert TinyMLLM(config).lm_head.out_features == 100


# --- flex: many lengths compile few shapes (a static compile per length hits torch's recompile limit) ------

@pytest.mark.slow
def test_flex_compiles_few_shapes_over_many_lengths():
    from torch._dynamo.utils import counters

    from sigma_ref.kernels import flex

    if not flex.compiler_available():
        pytest.skip("no C++ compiler: flex runs eagerly")
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for n in range(20, 32):                       # 12 distinct lengths, past the recompile limit of 8
            q, k, v = torch.randn(3, 1, 2, n, 16).unbind(0)
            ids = torch.randint(0, 2, (1, n), generator=torch.Generator().manual_seed(n))
            out, _ = sr.sigma_attention(q, k, v, ids, 1, backend="flex")
            torch.testing.assert_close(out, sr.sigma_attention(q, k, v, ids, 1, backend="math")[0], atol=1e-5, rtol=1e-5)
    assert {flex.padded_length(n) for n in range(20, 32)} == {128}
    assert counters["stats"]["unique_graphs"] - before <= 2
