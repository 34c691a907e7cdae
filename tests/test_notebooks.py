"""Every course notebook runs top to bottom (fast mode) through nbmake, its exercise check rejects wrong answers,
and it is committed clean.

Two facts about headless notebook runs shape these tests (see tests/notebook_runs.py):
- nbmake / nbclient execute every cell but never move a widget, and an exception inside a widget callback
  does not fail the run. The panels in sigma_ref.widgets put such an exception into their Output widget as
  an error output, and `output_widget_errors` below fails the test if any Output widget holds one.
- Each notebook runs once per session (solved, with probe cells for its exercise); the notebook, exercise and
  book tests share that run.
"""

import json
import re
from pathlib import Path

import nbformat
import pytest

from sigma_ref.teaching import course
from wrong_answers import WRONG_ANSWERS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def output_widget_errors(nb) -> list[str]:
    """Error outputs held by any Output widget in the executed notebook's widget state."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    errors = []
    for model_id, model in state.items():
        if model.get("model_name") == "OutputModel":
            for output in model.get("state", {}).get("outputs", []):
                if output.get("output_type") == "error":
                    errors.append(f"Output widget {model_id}: {output.get('ename')}: {output.get('evalue')}")
    return errors


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, notebook_runs, record_property):
    result = notebook_runs.get(path)
    record_property("seconds", round(result.seconds, 1))
    print(f"{path.name}: {result.seconds:.1f} s")
    if result.error is not None:
        pytest.fail(f"{path.name} failed in cell {result.error.failing_cell_index}:\n{result.error.trace}")
    assert output_widget_errors(nbformat.from_dict(result.nb)) == []
    # Cells that show text must not show a traceback either (e.g. a caught exception printed by a panel).
    for cell in result.nb["cells"]:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", f"{path.name}: {output.get('ename')}"


def test_there_are_eleven_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(11)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs_or_widget_state(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} has outputs"
    assert "widgets" not in nb["metadata"], f"{path.name} stores widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    """Starts with what the learner will be able to do; ends with a summary and an exercise the learner writes."""
    nb = course.read(path)
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and "you will be able to" in course.source(cells[0]).lower()
    markdown = [course.source(c) for c in cells if c["cell_type"] == "markdown"]
    assert any(re.search(r"^## Summary", s, re.M) for s in markdown), f"{path.name}: no summary"
    assert any(re.search(r"^## Exercise", s, re.M) for s in markdown), f"{path.name}: no exercise"
    triples = course.exercise_cells(nb)
    assert len(triples) == 1 and triples[0][2] == len(cells) - 1, "one exercise, its check the last cell"
    (stub_cell, solution_cell, _), = [[cells[i] for i in t] for t in triples]
    assert "raise NotImplementedError(" in course.source(stub_cell)
    assert solution_cell["metadata"].get("jupyter", {}).get("source_hidden"), "the solution is shown collapsed"
    assert "import sigma_ref" in "".join(course.source(c) for c in cells if c["cell_type"] == "code")


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_check_rejects_the_stub_and_wrong_answers(path, notebook_runs):
    """In the notebook's own kernel state: the check fails on the stub with its hint, fails on two plausible wrong
    answers with a message that shows what was expected, and passes on the stored solution."""
    result = notebook_runs.get(path)
    if result.error is not None:
        pytest.fail(f"{path.name} failed in cell {result.error.failing_cell_index}:\n{result.error.trace}")
    outcomes = result.probes()
    wrong = [f"wrong {i + 1}" for i in range(len(WRONG_ANSWERS[path.stem]))]
    assert sorted(outcomes) == sorted(["stub", "solution"] + wrong), outcomes
    assert len(wrong) >= 2
    assert outcomes["stub"].startswith("NotImplementedError: write "), outcomes["stub"]
    assert "Hint" in outcomes["stub"], outcomes["stub"]
    for name in wrong:
        kind, _, message = outcomes[name].partition(": ")
        assert kind == "AssertionError", f"{name} of {path.stem}: {outcomes[name]}"
        assert len(message) > 40, f"{name} of {path.stem}: the check's message does not say what was expected: {message!r}"
    assert outcomes["solution"] == "passed", outcomes["solution"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The whole course through `release` once (nbgrader's generate_assignment): {file name: learner copy}."""
    written = course.release(tmp_path_factory.mktemp("course"), NOTEBOOKS[0].parent)
    return {path.name: course.read(path) for path in written}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_learner_copy_has_the_stub_and_no_solution(path, released):
    nb, copy = course.read(path), released[path.name]
    assert not [c for c in copy["cells"] if course.SOLUTION in course.tags(c)]
    assert [s for _, s, _ in course.exercise_cells(copy)] == [None]   # exercise, then directly its check
    stub = [c for c in copy["cells"] if course.EXERCISE in course.tags(c)]
    assert [course.source(c).rstrip() for c in stub] == [s.rstrip() for s in course.stubs(nb)]
    for solution in course.solutions(nb):
        assert solution.strip() not in json.dumps(copy), "the solution's code leaked into the learner copy"
    # everything else is the notebook as committed, and every check is an autograded nbgrader cell
    kept = [c for c in nb["cells"] if course.SOLUTION not in course.tags(c)]
    assert [course.source(c).rstrip() for c in kept] == [course.source(c).rstrip() for c in copy["cells"]]
    checks = [c["metadata"]["nbgrader"] for c in copy["cells"] if course.CHECK in course.tags(c)]
    assert checks and all(m["grade"] and m["locked"] and m["points"] == course.CHECK_POINTS for m in checks)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_nbgrader_metadata_on_every_exercise(path):
    nb = course.read(path)
    assert nb == course.nbgrader_cell_metadata(nb, path.stem[:2])
