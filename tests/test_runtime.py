"""Run-time helpers: where the data is found, fast mode, atomic writes."""

from pathlib import Path

import pytest

import sigma_ref as sr
from sigma_ref import data as D
from sigma_ref import runtime


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


def test_write_atomic_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "results.json"
    runtime.write_atomic(path, "old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runtime.write_atomic(path, broken)
    assert path.read_text() == "old"


@pytest.mark.parametrize("idle_share,expected", [(1.0, 2), (0.5, 1), (0.05, 1), (0.8, 2)])
def test_idle_cores_counts_the_cores_other_programs_leave_free(monkeypatch, idle_share, expected):
    """Two CPUs over one interval: all idle -> 2, one held by another program -> 1, both busy -> still 1."""
    readings = iter([(0, 0, 2), (int(idle_share * 200), 200, 2)])      # (idle, total) jiffies and the CPU count
    monkeypatch.setattr(runtime, "_cpu_jiffies", lambda: next(readings))
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    assert runtime.idle_cores(interval=0) == expected


def test_idle_cores_on_this_machine_is_between_one_and_its_cores():
    assert 1 <= runtime.idle_cores(interval=0.05) <= runtime.cpu_cores()
    jiffies = runtime._cpu_jiffies()
    assert jiffies is None or (jiffies[2] >= 1 and 0 <= jiffies[0] <= jiffies[1])
