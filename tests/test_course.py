"""sigma_ref.teaching.course on small hand-made notebooks: the exercise tags, solved and learner copies, bad input."""

import json
import subprocess
import sys

import pytest

from sigma_ref.teaching import course


def cell(kind, text, *tags):
    made = {"cell_type": kind, "metadata": {"tags": list(tags)} if tags else {}, "source": text}
    if kind == "code":
        made.update(outputs=[{"output_type": "stream", "name": "stdout", "text": "old\n"}], execution_count=3)
    return made


def notebook(*cells):
    return {"cells": list(cells), "metadata": {"widgets": {"state": {}}}, "nbformat": 4, "nbformat_minor": 5}


STUB = "def f():\n    raise NotImplementedError('write f. Hint: 42')\n"
SOLUTION = "def f():\n    return 42\n"
CHECK = "assert f() == 42, 'expected 42'\nprint('correct')\n"


def course_notebook():
    return notebook(cell("markdown", "# T\n"), cell("code", "x = 1\n"), cell("markdown", "## Exercise\n"),
                    cell("code", STUB, "exercise"), cell("raw", SOLUTION, "solution"), cell("code", CHECK, "check"))


def test_solved_puts_the_solution_in_the_exercise_cell_and_drops_the_raw_cell():
    nb = course_notebook()
    solved = course.solved(nb)
    assert [c["cell_type"] for c in solved["cells"]] == ["markdown", "code", "markdown", "code", "code"]
    assert solved["cells"][3]["source"] == SOLUTION and "exercise" in course.tags(solved["cells"][3])
    assert nb["cells"][3]["source"] == STUB                        # the input is not changed


def test_learner_copy_keeps_the_stub_and_drops_solutions_outputs_and_widget_state():
    copy = course.learner_copy(course_notebook())
    assert [course.source(c) for c in copy["cells"]] == ["# T\n", "x = 1\n", "## Exercise\n", STUB, CHECK]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in copy["cells"] if c["cell_type"] == "code")
    assert "widgets" not in copy["metadata"]
    assert course.exercise_cells(copy) == [(3, None, 4)]
    assert course.learner_copy(copy) == copy                        # a learner copy of a learner copy: the same
    with pytest.raises(ValueError, match="no solution cell"):
        course.solutions(copy)


def test_the_solved_and_learner_copies_run_as_the_course_says():
    """Executed as plain Python: the solved copy prints "correct", the learner copy stops at the stub's hint."""
    def run(nb):
        code = "\n".join(course.source(c) for c in nb["cells"] if c["cell_type"] == "code")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    solved = run(course.solved(course_notebook()))
    assert solved.returncode == 0 and solved.stdout == "correct\n"
    learner = run(course.learner_copy(course_notebook()))
    assert learner.returncode != 0 and "NotImplementedError: write f. Hint: 42" in learner.stderr


def test_committed_checks_may_raise_under_nbmake_and_solved_ones_may_not():
    """nbmake's raises-exception tag lets `pytest --nbmake notebooks/` pass on the committed notebooks (the stub
    in place raises at the check, by design); a solved copy must print "correct", so solved() drops it."""
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = course.read(path)
        checks = [check for _, _, check in course.exercise_cells(nb)]
        assert all(course.STUB_RAISES in course.tags(nb["cells"][i]) for i in checks), path.name
        raising = [i for i, c in enumerate(nb["cells"]) if course.STUB_RAISES in course.tags(c)]
        assert raising == checks, f"{path.name}: only the check cell may be expected to raise"
        solved = course.solved(nb)
        assert not any(course.STUB_RAISES in course.tags(c) for c in solved["cells"]), path.name


@pytest.mark.parametrize("cells, message", [
    ([cell("code", STUB, "exercise"), cell("code", CHECK)], "must be followed"),
    ([cell("code", STUB, "exercise"), cell("code", SOLUTION, "solution"), cell("code", CHECK, "check")],
     "must be followed"),                                             # a solution must be a raw cell
    ([cell("markdown", STUB, "exercise"), cell("code", CHECK, "check")], "expected a code cell"),
    ([cell("raw", SOLUTION, "solution"), cell("code", CHECK, "check")], "outside an exercise"),
    ([cell("code", STUB, "exercise")], "must be followed"),
])
def test_malformed_exercises_are_a_clear_value_error(cells, message):
    with pytest.raises(ValueError, match=message):
        course.exercise_cells(notebook(*cells))


def test_answers_must_match_the_exercises():
    with pytest.raises(ValueError, match="answers: 2 given, expected one per exercise"):
        course.with_answers(course_notebook(), ["a", "b"])


def test_release_of_a_directory_without_notebooks_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="notebooks_dir: no NN_"):
        course.release(tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def graded_notebook():
    """course_notebook with nbgrader's cell metadata and a kernelspec, as the committed notebooks have them."""
    nb = course.nbgrader_cell_metadata(course_notebook(), "00")
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_nbgrader_metadata_marks_the_exercise_and_solution_as_solutions_and_the_check_as_graded():
    cells = graded_notebook()["cells"]
    assert [c["metadata"].get("nbgrader", {}).get("grade_id") for c in cells] == \
        [None, None, None, "00-exercise-1", "00-solution-1", "00-check-1"]
    check = cells[5]["metadata"]["nbgrader"]
    assert check["grade"] and check["locked"] and check["points"] == course.CHECK_POINTS and not check["solution"]
    assert cells[3]["metadata"]["nbgrader"]["solution"] and not cells[3]["metadata"]["nbgrader"]["locked"]


def test_nbgrader_source_holds_the_solution_after_the_stub_between_nbgraders_markers():
    source = course.nbgrader_source(graded_notebook())
    assert [c["cell_type"] for c in source["cells"]] == ["markdown", "code", "markdown", "code", "code"]
    assert source["cells"][3]["source"] == f"{STUB.rstrip()}\n### BEGIN SOLUTION\n{SOLUTION.rstrip()}\n### END SOLUTION\n"
    namespace = {}
    exec(source["cells"][3]["source"], namespace)                   # the instructor's Run All passes the check
    exec(CHECK, namespace)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """`python -m sigma_ref release` on one graded notebook: an nbgrader course directory."""
    root = tmp_path_factory.mktemp("course")
    (root / "nb").mkdir()
    course.write(graded_notebook(), root / "nb" / "00_t.ipynb")
    done = subprocess.run([sys.executable, "-m", "sigma_ref", "release", "--out", str(root / "out"),
                           "--notebooks", str(root / "nb")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root / "out"


def test_release_is_nbgraders_learner_copy_with_the_stub_and_its_hint(released):
    learner = course.read(released / "release" / course.ASSIGNMENT / "00_t.ipynb")
    text = json.dumps(learner)
    assert "return 42" not in text and "BEGIN SOLUTION" not in text        # no solution left anywhere
    plain = course.learner_copy(graded_notebook())
    assert [course.source(c).rstrip() for c in learner["cells"]] == [course.source(c).rstrip() for c in plain["cells"]]
    assert course.tags(learner["cells"][3]) == ["exercise"] and "Hint: 42" in course.source(learner["cells"][3])


def test_nbgrader_autograde_gives_full_marks_to_the_solution_and_none_to_the_stub(released):
    from nbgrader.api import Gradebook

    learner = course.read(released / "release" / course.ASSIGNMENT / "00_t.ipynb")
    answered = json.loads(json.dumps(learner))
    answered["cells"][3]["source"] = SOLUTION
    wrong = json.loads(json.dumps(learner))
    wrong["cells"][3]["source"] = "def f():\n    return 41\n"
    for student, nb in (("solved", answered), ("stub", learner), ("wrong", wrong)):
        folder = released / "submitted" / student / course.ASSIGNMENT
        folder.mkdir(parents=True)
        course.write(nb, folder / "00_t.ipynb")
    course.nbgrader(["autograde", course.ASSIGNMENT, "--force"], released)
    with Gradebook(f"sqlite:///{released / 'gradebook.db'}") as gradebook:
        scores = {s: gradebook.find_submission(course.ASSIGNMENT, s).score for s in ("solved", "stub", "wrong")}
        maximum = gradebook.find_assignment(course.ASSIGNMENT).max_score
    assert maximum == course.CHECK_POINTS
    assert scores == {"solved": course.CHECK_POINTS, "stub": 0, "wrong": 0}


def test_widget_snapshots_replace_a_displayed_widget_by_what_its_output_widgets_show():
    picture = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBOR"}}
    view = {"output_type": "display_data", "metadata": {},
            "data": {course.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "VBox(...)"}}
    nb = notebook(cell("code", "panel()"))
    nb["cells"][0]["outputs"] = [view]
    nb["metadata"]["widgets"] = {course.WIDGET_STATE: {"state": {
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_slider", "IPY_MODEL_out"]}},
        "slider": {"model_name": "IntSliderModel", "state": {}},
        "out": {"model_name": "OutputModel", "state": {"outputs": [picture]}}}}}
    static = course.widget_snapshots(nb)
    assert static["cells"][0]["outputs"] == [course.SNAPSHOT_NOTE, picture]
    assert "widgets" not in static["metadata"]
    assert nb["cells"][0]["outputs"] == [view]                     # the input is not changed
