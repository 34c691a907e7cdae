"""The speedrun's pieces: the recipe ladder ends at the preset, time-to-target reports what training did, and
the thread table measures both thread counts under both loads."""

import dataclasses

import pytest

from sigma_ref.lab import speedrun
from sigma_ref import train as T

from conftest import tiny_config

TINY = T.TrainConfig(tiny_config(), steps=12, batch_size=8, warmup_steps=3,
                     eval_every=4, eval_samples=8, checkpoint_every=4)


def test_the_ladder_starts_at_the_old_recipe_and_ends_at_the_cpu_preset():
    recipes = speedrun.ladder_recipes()
    first, last = recipes[0][1], recipes[-1][1]
    assert (first.model.hidden_size, first.model.num_layers, first.optimizer, first.steps) == (96, 3, "adamw", 3000)
    preset = T.PRESETS["cpu"]
    # Only the stopping rule and the logging intervals differ: the speedrun sets its own target.
    bookkeeping = ("target_exact_match", "target_every", "target_samples", "target_checks", "eval_every",
                   "checkpoint_every")
    assert dataclasses.replace(last, **{f: getattr(preset, f) for f in bookkeeping}) == preset
    for (_, before), (change, after) in zip(recipes, recipes[1:]):
        assert before != after, f"rung {change!r} changes nothing"


def test_time_to_target_replays_the_measured_target_and_reports_where_the_recipe_stopped():
    reached = dataclasses.replace(TINY, target_exact_match=0.0, target_every=4, target_samples=4)
    missed = dataclasses.replace(TINY, target_exact_match=1.0, target_every=4, target_samples=4)
    jobs = [{"attention": "sigma", "seed": 0, "config": reached, "measure": 0.0},
            {"attention": "gated", "seed": 1, "config": missed, "measure": 1.0}]
    first, second = speedrun.run_to_target(jobs, workers=1, progress=False)
    assert first["reached"] and first["step"] == 4 and first["seconds"] > 0
    assert first["stopped_by_rule"] and first["stopped_step"] == 4
    assert not second["reached"] and second["step"] == TINY.steps and second["seconds"] > 0
    assert not second["stopped_by_rule"] and second["stopped_step"] == TINY.steps
    assert (first["attention"], first["seed"], second["attention"], second["seed"]) == ("sigma", 0, "gated", 1)
    for result in (first, second):
        assert 0 <= result["caption_exact_match"] <= 1 and 0 <= result["compositional_exact_match"] <= 1


def test_first_firing_replays_the_rule_the_trainer_stops_by():
    curve = [(25, 1.0, 0.96), (50, 2.0, 0.94), (75, 3.0, 0.97), (100, 4.0, 0.99), (125, 5.0, 0.99)]
    assert T.first_firing(curve, 0.95, 1) == (25, 1.0)
    assert T.first_firing(curve, 0.95, 2) == (100, 4.0)
    assert T.first_firing(curve, 0.98, 2) == (125, 5.0)
    assert T.first_firing(curve, 0.995, 1) is None


def test_summary_rows_are_median_min_max_and_how_many_reached():
    results = [{"seconds": s, "reached": r, "step": st, "stopped_seconds": stop, "caption_exact_match": em,
                "compositional_exact_match": 0.5}
               for s, r, st, stop, em in [(30.0, True, 600, 35.0, 0.96), (10.0, True, 400, 12.0, 0.99),
                                          (20.0, False, 700, 40.0, 0.95)]]
    assert speedrun._summary(results) == [20.0, 10.0, 30.0, "2/3", 600, 35.0, 40.0, 0.95, pytest.approx(0.9666666),
                                          pytest.approx(0.5)]


def test_thread_table_measures_both_thread_counts_with_the_other_core_idle_and_busy():
    table = speedrun.thread_table(repeats=2, progress=False)
    assert [(row[0], row[1]) for row in table.rows] == [(1, "idle"), (2, "idle"), (1, "busy"), (2, "busy")]
    assert all(row[2] > 0 for row in table.rows) and table.rows[0][3] == 1.0


def test_the_cpu_presets_stopping_rule_is_the_studied_one_and_holds_on_the_committed_study():
    """The preset's rule is a row of the committed study, which the code as it is now reproduces from the
    committed curves; on those seeds (never used to tune the recipe) no run stopped below 95% test exact match,
    where the rule it replaced let at least one through (two in the committed study)."""
    import json
    from pathlib import Path

    study = json.loads((Path(__file__).resolve().parents[1] / "results" / "stopping_rule_cpu.json").read_text())
    table = speedrun.stopping_rule_table(study["runs"]["check_curves"]).as_dict()
    assert table == json.loads(json.dumps(study["tables"][0]))
    preset = T.PRESETS["cpu"]
    rule = [preset.target_exact_match, preset.target_samples, preset.target_every, preset.target_checks]
    rows = {tuple(key): row for key, row in zip(table["keys"], table["rows"])}
    columns = table["columns"]
    assert rows[tuple(rule)][columns.index("runs below 95%")] == 0
    assert rows[speedrun.STOPPING_RULES[0]][columns.index("runs below 95%")] >= 1
    seeds = {curve["seed"] for curve in study["runs"]["check_curves"]}
    assert len(seeds) == 10 and not seeds & set(range(10))          # not the seeds compare and dilution train
