"""Training runs on disk: resumed after a crash, the same in parallel workers, refused for another recipe."""

import json
import subprocess
import sys
import threading
import time

import pytest

from sigma_ref.lab import experiments as X
from sigma_ref.lab import runs as R
from sigma_ref import runtime
from sigma_ref import train as T

from conftest import tiny_config


TINY = T.TrainConfig(tiny_config(), steps=12, batch_size=8, warmup_steps=3,
                     eval_every=4, eval_samples=8, checkpoint_every=4)


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
    monkeypatch.setattr(R, "train_and_evaluate", lambda **job: pytest.fail(f"retrained {job}"))
    again = X.ensure_trained("tiny", [0, 1], tmp_path / "parallel", attentions=["gated"], progress=False)
    assert [r["loss_curve"] for r in again["gated"]] == [r["loss_curve"] for r in parallel["gated"]]
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        X.ensure_trained("tiny", [2], tmp_path / "serial", attentions=["gated"], workers=0)


def test_the_workers_take_the_costliest_runs_first_and_each_result_keeps_its_run(tmp_path, monkeypatch):
    """Longest-processing-time order: MODA's runs, then SIGMA's, Gated's, standard's, seeds in order within
    one attention; the results still come back under their own (attention, seed)."""
    assert sorted(X.COSTLIEST_FIRST) == sorted(X.ATTENTION_KINDS)
    monkeypatch.setitem(T.PRESETS, "tiny", TINY)
    taken = []
    def fake_run(function, jobs, workers=None, desc="", progress=True):
        taken.extend((job["attention"], job["seed"]) for job in jobs)
        return [{"attention": job["attention"], "seed": job["seed"]} for job in jobs]
    monkeypatch.setattr(X, "run_in_workers", fake_run)
    runs = X.ensure_trained("tiny", [0, 1], tmp_path, attentions=list(X.ATTENTION_KINDS), progress=False)
    assert taken == [(a, s) for a in X.COSTLIEST_FIRST for s in (0, 1)]
    assert all(r["attention"] == a and r["seed"] == s for a in runs for s, r in zip((0, 1), runs[a]))


def test_a_training_worker_starts_without_the_drawing_modules():
    """A spawned worker imports the module of its job function (runs.train_job) and never draws: matplotlib,
    which `experiments` imports for its figures, would add about a second to every worker's start."""
    code = "import sys, sigma_ref.lab.runs; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False" and X.train_job is R.train_job and R.train_job.__module__ == "sigma_ref.lab.runs"


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


def test_a_second_caller_waits_for_the_models_instead_of_training_them_again(tmp_path, monkeypatch):
    """Two notebooks asking for the same models at once (two threads here): one trains, the other waits on the
    directory's lock and reuses what the first wrote."""
    monkeypatch.setitem(T.PRESETS, "tiny", TINY)
    trained, original = [], R.train_and_evaluate

    def slow_training(**job):            # a window in which the other caller looks for the same run
        trained.append(job["seed"])
        time.sleep(1.0)
        return original(**job)

    monkeypatch.setattr(R, "train_and_evaluate", slow_training)
    results = [None, None]

    def call(i):
        results[i] = X.ensure_trained("tiny", [0], tmp_path / "runs", attentions=["gated"], progress=False, workers=1)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert trained == [0]
    assert results[0]["gated"][0]["loss_curve"] == results[1]["gated"][0]["loss_curve"]
