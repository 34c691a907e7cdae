"""Shared hypothesis strategies and helpers for the tests."""

import functools
import os
import re
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import settings

from sigma_ref import data as D
from sigma_ref.model import ModelConfig, TinyMLLM

# Property tests run many small cases; keep CI's run bounded and deterministic.
settings.register_profile("course", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "course"))

# One torch thread per process, here and in every process the tests start (notebook kernels, JupyterLab,
# training workers inherit OMP_NUM_THREADS): two threads collapse when another program holds a core
# (docs/PERFORMANCE.md measures a step at 2.2x), and the test command must hold on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@st.composite
def modality_rows(draw, max_batch=3, max_len=64):
    """[B, S] modality ids: each row independently random, all-text, all-image or alternating."""
    batch = draw(st.integers(1, max_batch))
    seq_len = draw(st.integers(1, max_len))
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["random", "text", "image", "alternate", "runs"]))
        if kind == "random":
            row = draw(st.lists(st.integers(0, 1), min_size=seq_len, max_size=seq_len))
        elif kind == "text":
            row = [0] * seq_len
        elif kind == "image":
            row = [1] * seq_len
        elif kind == "alternate":
            start = draw(st.integers(0, 1))
            row = [(start + i) % 2 for i in range(seq_len)]
        else:  # runs: text prompt, image block, text caption
            a = draw(st.integers(0, seq_len))
            b = draw(st.integers(a, seq_len))
            row = [0] * a + [1] * (b - a) + [0] * (seq_len - b)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture(autouse=True)
def close_figures():
    """Figures made by the code under test are closed after each test (pyplot keeps them otherwise)."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory):
    """Each course notebook executed at most once per session (tests/notebook_runs.py), across all workers:
    under pytest-xdist each worker's base directory sits in the session's, which they share."""
    from notebook_runs import NotebookRuns

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    workdir = shared / "notebook-runs"
    workdir.mkdir(exist_ok=True)
    return NotebookRuns(workdir)


@functools.cache
def _notebooks_reusing_trained_models(folder: Path) -> frozenset[Path]:
    """The notebooks that load the course's trained models (experiments.ensure_trained), except the first."""
    users = [p for p in sorted(folder.glob("[0-9][0-9]_*.ipynb")) if "ensure_trained(" in p.read_text()]
    return frozenset(users[1:])


@pytest.hookimpl(tryfirst=True)           # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items):
    """How `pytest -n` (pytest-xdist with --dist loadgroup --no-loadscope-reorder, as course.sh runs it) spreads
    the tests; a worker takes the next group when it has finished one. Each test file is one group, on one
    worker, so module and session fixtures (a JupyterLab server, a trained model) are built once; each notebook
    is a group of its own, so the longest tests spread over the workers. Order: the notebooks first, except
    those that reuse the models an earlier notebook trains (they go after the files, by when those models are
    there; meanwhile they would wait on the training lock); the book test, which needs every notebook, last."""
    def group(item) -> tuple[int, str]:
        path = item.callspec.params.get("path") if hasattr(item, "callspec") else None
        if "notebook_runs" not in item.fixturenames:
            return 1, item.path.name
        if isinstance(path, Path):
            return 2 if path in _notebooks_reusing_trained_models(path.parent) else 0, f"notebook-{path.stem}"
        return 3, f"all-notebooks-{item.name}"

    groups = {item.nodeid: group(item) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid][1]))
    items.sort(key=lambda item: groups[item.nodeid][0])


def pytest_terminal_summary(terminalreporter):
    """How long each notebook took to execute (fast mode): where the test command's time goes. Read from the
    reports (the `seconds` property of test_notebook_runs_in_fast_mode), which reach this process from every
    xdist worker."""
    seconds = {}
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        if "test_notebook_runs_in_fast_mode" in getattr(report, "nodeid", "") and report.when == "call":
            seconds.update({re.search(r"\[(.+?)\]", report.nodeid).group(1): value
                            for name, value in report.user_properties if name == "seconds"})
    if seconds:
        terminalreporter.write_sep("-", "notebook executions (fast mode, seconds)")
        for name in sorted(seconds):
            terminalreporter.write_line(f"{seconds[name]:7.1f}  {name}")


def tiny_config(attention="sigma", **options) -> ModelConfig:
    """The tests' model on the toy vocabulary: hidden 32, 4 heads, 2 layers; `options` as ModelConfig.updated
    takes them (any level: num_layers, num_intra_heads, backend, ...)."""
    sizes = {"hidden_size": 32, "num_heads": 4, "num_layers": 2}
    return ModelConfig(**D.model_fields()).updated(attention=attention, **{**sizes, **options})


def tiny_model(attention="sigma", backend="auto"):
    """A seeded two-layer TinyMLLM (hidden 32, 4 heads) in eval mode."""
    torch.manual_seed(0)
    return TinyMLLM(tiny_config(attention, backend=backend)).eval()
