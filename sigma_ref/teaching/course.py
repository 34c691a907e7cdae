"""The course as a teacher hands it out: exercises with hidden solutions, learner copies, the executed book.

Every notebook ends with an exercise made of three consecutive cells, marked by cell tags (the mechanism
Jupyter, nbgrader and jupyter-book all use to single cells out):

- ``exercise``: a code cell the learner edits. It is committed as a stub that raises NotImplementedError with
  a hint, so Run All on a fresh notebook stops at the check with that hint instead of printing "correct".
- ``solution``: a RAW cell with a correct answer. Jupyter never executes raw cells, so Run All does not run it;
  JupyterLab shows it collapsed, for self-study.
- ``check``: the automatic check. It fails on the stub and on plausible wrong answers with a message that says
  what was expected, and prints "correct" on a right one. The committed check cell also carries nbmake's
  ``raises-exception`` tag: on the committed notebook (the stub in place) it raises by design, so
  ``pytest --nbmake notebooks/`` passes; ``solved(nb)`` removes the tag, so a solved run must print "correct".

From those tags:
- ``solved(nb)`` puts each solution into its exercise cell: what the tests execute and what the book shows;
- ``learner_copy(nb)`` drops the solutions: what a learner gets;
- ``build_book(out)`` executes the solved notebooks and renders them with jupyter-book into a static site.

Grading with nbgrader. The three cells also carry nbgrader's own cell metadata (``metadata.nbgrader``: the
exercise and its raw solution are solution cells, the check is a locked, autograded test cell with points), so
JupyterLab's nbgrader tools see a graded assignment. ``python -m sigma_ref release --out DIR`` makes DIR an
nbgrader course directory: ``nbgrader_source(nb)`` writes the instructor's version of each notebook to
``DIR/source/sigma/`` in nbgrader's convention (the solution between ``### BEGIN SOLUTION`` and ``### END
SOLUTION`` in the exercise cell, after the stub, so the instructor's Run All passes every check), and
``nbgrader generate_assignment`` writes the learner copies to ``DIR/release/sigma/``: nbgrader removes the
marked region and keeps the stub with its hint (the course's nbgrader_config.py sets an empty code stub). A
class then collects submissions and runs ``nbgrader autograde sigma``: each check is worth its points when it
passes, nothing when it raises (docs/TEACHING.md walks through it). The committed notebooks are not
nbgrader's source themselves: a learner who opens them should meet the stub, not the solution.

Notebooks are JSON; this module edits them as dicts and imports the Jupyter packages (the dev extra) only where
it executes or renders them.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from . import launch

EXERCISE, SOLUTION, CHECK = "exercise", "solution", "check"
STUB_RAISES = "raises-exception"             # nbmake: this cell is expected to raise (the stub is in place)
ASSIGNMENT = "sigma"                         # the nbgrader assignment that holds the course's notebooks
CHECK_POINTS = 1                             # points of each check cell
BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
NBGRADER_CONFIG = """\
# Written by `python -m sigma_ref release`: the SIGMA course as an nbgrader course directory.
c = get_config()
c.CourseDirectory.course_id = "sigma"
# The solution region comes after the course's own stub (which raises with a hint); the release keeps the stub.
c.ClearSolutions.code_stub = {"python": ""}
"""


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def source(cell: dict) -> str:
    """A cell's source as one string (nbformat allows a string or a list of lines)."""
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def exercise_cells(nb: dict) -> list[tuple[int, int | None, int]]:
    """(exercise, solution, check) cell indices of every exercise in the notebook, in order.

    The solution is None in a learner copy (exercise cell followed directly by its check). Raises ValueError
    when the tags do not form consecutive exercise -> [raw solution] -> check cells.
    """
    cells = nb["cells"]

    def kind(index):
        if index >= len(cells):
            return None
        own = [t for t in tags(cells[index]) if t in (EXERCISE, SOLUTION, CHECK)]
        return (cells[index]["cell_type"], own)

    found = []
    for index, cell in enumerate(cells):
        if EXERCISE not in tags(cell):
            continue
        if kind(index) != ("code", [EXERCISE]):
            raise ValueError(f"nb: cell {index} is tagged 'exercise' but is {kind(index)}; expected a code cell")
        if kind(index + 1) == ("raw", [SOLUTION]) and kind(index + 2) == ("code", [CHECK]):
            found.append((index, index + 1, index + 2))
        elif kind(index + 1) == ("code", [CHECK]):
            found.append((index, None, index + 1))
        else:
            raise ValueError(f"nb: the exercise at cell {index} must be followed by a raw 'solution' cell (optional) "
                             f"and a 'check' code cell; saw {kind(index + 1)} then {kind(index + 2)}")
    paired = {i for triple in found for i in triple if i is not None}
    stray = [i for i, c in enumerate(cells) if {SOLUTION, CHECK} & set(tags(c)) and i not in paired]
    if stray:
        raise ValueError(f"nb: cells {stray} are tagged 'solution' or 'check' outside an exercise; "
                         "expected each right after an 'exercise' cell")
    return found


def with_answers(nb: dict, answers: list[str]) -> dict:
    """A copy of nb with exercise k's cell holding answers[k], and no solution cells."""
    triples = exercise_cells(nb)
    if len(answers) != len(triples):
        raise ValueError(f"answers: {len(answers)} given, expected one per exercise ({len(triples)})")
    out = copy.deepcopy(nb)
    for (exercise, _, _), answer in zip(triples, answers):
        out["cells"][exercise]["source"] = answer
    solution_cells = {s for _, s, _ in triples if s is not None}
    out["cells"] = [c for i, c in enumerate(out["cells"]) if i not in solution_cells]
    return out


def solutions(nb: dict) -> list[str]:
    """The stored solution of every exercise; ValueError for a notebook without them (a learner copy)."""
    triples = exercise_cells(nb)
    if any(s is None for _, s, _ in triples):
        raise ValueError("nb: an exercise has no solution cell (is this a learner copy?); expected the course's "
                         "own notebook, with a raw 'solution' cell after each 'exercise' cell")
    return [source(nb["cells"][s]) for _, s, _ in triples]


def stubs(nb: dict) -> list[str]:
    return [source(nb["cells"][e]) for e, _, _ in exercise_cells(nb)]


def solved(nb: dict) -> dict:
    """The notebook with every solution in its exercise cell: Run All prints "correct" at each check (which
    may no longer raise: its raises-exception tag is removed)."""
    out = with_answers(nb, solutions(nb))
    for _, _, check in exercise_cells(out):
        metadata = out["cells"][check]["metadata"]
        metadata["tags"] = [tag for tag in tags(out["cells"][check]) if tag != STUB_RAISES]
    return out


def learner_copy(nb: dict) -> dict:
    """The notebook without solutions, outputs or widget state: what a learner gets."""
    out = with_answers(nb, stubs(nb))
    for cell in out["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    out["metadata"].pop("widgets", None)
    return out


def nbgrader_cell_metadata(nb: dict, prefix: str) -> dict:
    """A copy of nb whose exercise, solution and check cells carry nbgrader's cell metadata (schema 3), with grade
    ids `prefix`-exercise-K, -solution-K and -check-K. Other cells keep theirs."""
    out = copy.deepcopy(nb)
    for k, (exercise, solution, check) in enumerate(exercise_cells(out), 1):
        roles = [(exercise, "exercise", True, False), (solution, "solution", True, False), (check, "check", False, True)]
        for index, role, is_solution, is_check in roles:
            if index is None:
                continue
            metadata = {"grade": is_check, "grade_id": f"{prefix}-{role}-{k}", "locked": is_check,
                        "schema_version": 3, "solution": is_solution, "task": False}
            if is_check:
                metadata["points"] = CHECK_POINTS
            out["cells"][index]["metadata"]["nbgrader"] = metadata
    return out


def nbgrader_source(nb: dict) -> dict:
    """The instructor's version of a course notebook in nbgrader's convention: each exercise cell holds the stub,
    then the solution between BEGIN/END SOLUTION (so Run All passes every check); no raw solution cells; checks
    without nbmake's raises-exception tag; no outputs."""
    answers = [f"{stub.rstrip()}\n{BEGIN_SOLUTION}\n{answer.rstrip()}\n{END_SOLUTION}\n"
               for stub, answer in zip(stubs(nb), solutions(nb))]
    out = with_answers(nb, answers)
    for _, _, check in exercise_cells(out):
        out["cells"][check]["metadata"]["tags"] = [t for t in tags(out["cells"][check]) if t != STUB_RAISES]
    for cell in out["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    out["metadata"].pop("widgets", None)
    return out


def nbgrader(args: list[str], course_dir: str | Path) -> subprocess.CompletedProcess:
    """Run `nbgrader ARGS` in the course directory (the teacher extra installs nbgrader); RuntimeError with its
    output when it fails."""
    result = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course_dir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def read(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write(nb: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


CHECKOUT = Path(__file__).resolve().parents[2]          # the source checkout this package is installed from


def default_notebooks_dir() -> Path:
    """The course's notebooks/ in the source checkout that this package is installed from."""
    directory = CHECKOUT / "notebooks"
    if not directory.is_dir():
        raise ValueError(f"notebooks: no course notebooks at {directory} (sigma_ref is not installed from a "
                         "checkout of the course); pass the notebooks directory explicitly")
    return directory


def course_notebooks(notebooks_dir: str | Path | None = None) -> list[Path]:
    directory = Path(notebooks_dir) if notebooks_dir is not None else default_notebooks_dir()
    paths = sorted(directory.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise ValueError(f"notebooks_dir: no NN_*.ipynb notebooks in {directory}")
    return paths


def release(out: str | Path, notebooks_dir: str | Path | None = None) -> list[Path]:
    """Make `out` an nbgrader course directory holding the course: its nbgrader_config.py, the instructor's
    notebooks in out/source/sigma/ (nbgrader_source) and, from `nbgrader generate_assignment`, the learner copies
    in out/release/sigma/; returns the learner copies' paths."""
    paths = course_notebooks(notebooks_dir)
    out = Path(out)
    source_dir = out / "source" / ASSIGNMENT
    for stale in (source_dir, out / "release" / ASSIGNMENT):
        if stale.exists():
            shutil.rmtree(stale)
    source_dir.mkdir(parents=True)
    (out / "nbgrader_config.py").write_text(NBGRADER_CONFIG)
    for path in paths:
        write(nbgrader_source(read(path)), source_dir / path.name)
    nbgrader(["generate_assignment", ASSIGNMENT, "--force"], out)
    return [out / "release" / ASSIGNMENT / path.name for path in paths]


def execute(nb: dict, cwd: str | Path, timeout: int = 1200) -> dict:
    """Run every cell of a notebook in a fresh python3 kernel (the course's kernel); returns the executed copy."""
    from nbclient import NotebookClient
    import nbformat

    notebook = nbformat.reads(json.dumps(nb), as_version=4)          # also joins list-of-lines sources
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return json.loads(nbformat.writes(notebook))


WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SNAPSHOT_NOTE = {"output_type": "display_data", "metadata": {}, "data": {
    "text/markdown": "*A snapshot of the interactive panel as it first appears: run the notebook to move its sliders.*",
    "text/plain": "(a snapshot of the interactive panel)"}}


def widget_snapshots(nb: dict) -> dict:
    """A copy of an executed notebook in which each displayed widget is replaced by what its Output widgets show.

    A static page cannot run widgets (and the widget manager's JavaScript would come from a CDN), but the saved
    widget state holds each Output widget's outputs, e.g. the panels' first figure (sigma_ref.widgets).
    """
    out = copy.deepcopy(nb)
    state = out["metadata"].pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})

    def outputs_of(model_id: str) -> list[dict]:
        model = state.get(model_id, {})
        if model.get("model_name") == "OutputModel":
            return list(model.get("state", {}).get("outputs", []))
        return [o for child in model.get("state", {}).get("children", [])
                for o in outputs_of(child.removeprefix("IPY_MODEL_"))]

    for cell in out["cells"]:
        outputs = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            snapshot = outputs_of(view["model_id"]) if view else []
            outputs += [SNAPSHOT_NOTE] + snapshot if snapshot else [output]
        if cell["cell_type"] == "code":
            cell["outputs"] = outputs
    return out


BOOK_CONFIG = """\
# Written by `python -m sigma_ref book`: the executed course as a static site (jupyter-book 1.x, Sphinx).
title: "SIGMA: a course on multimodal attention"
author: "the SIGMA course"
only_build_toc_files: true
execute:
  execute_notebooks: "off"      # the notebooks arrive executed (sigma_ref.teaching.course.execute)
sphinx:
  config:
    html_show_copyright: false
    nb_merge_streams: true
"""

BOOK_INTRO = """\
# SIGMA: a course on multimodal attention

This is the course's notebooks, executed, with their outputs and figures: a version to read without running
anything. To run and change them, clone the repository and run `bash course.sh start`.

Each notebook ends with an exercise. The book shows a solution in the exercise cell (click to show it); the
learner copies (`python -m sigma_ref release --out DIR`) have a stub there instead.

The figures come from one run of each notebook on the machine that built this book; the README and
docs/TEACHING.md give the committed, several-seed results.
"""


def publish(repository: str, root: str | Path | None = None) -> list[Path]:
    """Write the course's public URL everywhere it links to itself, in the checkout at `root` (default: the one
    this package is installed from; launch.py): pyproject.toml's [project.urls] Repository, every notebook's
    install cell, README.md's launch badges. Returns the files written."""
    launch.check_repository(repository)
    root = CHECKOUT if root is None else Path(root)
    paths = course_notebooks(root / "notebooks")
    notebooks = {path: read(path) for path in paths}
    for path, nb in notebooks.items():                       # every notebook checked before any file changes
        found = [c for c in nb["cells"] if launch.is_install_cell(c)]
        if len(found) != 1:
            raise ValueError(f"notebooks: {path.name} has {len(found)} install cells (COURSE_REPOSITORY = ...), "
                             "expected 1")
    readme, pyproject = root / "README.md", root / "pyproject.toml"
    badges = launch.with_launch_badges(readme.read_text(), repository)
    pyproject.write_text(launch.with_repository_url(pyproject.read_text(), repository))
    for path, nb in notebooks.items():
        cell, = [c for c in nb["cells"] if launch.is_install_cell(c)]
        cell["source"] = launch.install_cell(repository).splitlines(keepends=True)
        write(nb, path)
    readme.write_text(badges)
    return [pyproject, *paths, readme]


def build_book(out: str | Path, notebooks_dir: str | Path | None = None,
               executed: dict[str, dict] | None = None, progress: bool = True, repository: str | None = None) -> Path:
    """Build the executed course as a static site; returns the path of its index.html.

    `repository` (default: the published URL in pyproject.toml, launch.py) adds jupyter-book's Binder and Colab
    launch buttons to every notebook page.

    Each notebook is solved (solutions in the exercise cells, collapsed behind jupyter-book's "hide-input"),
    executed in a fresh kernel unless `executed` already holds its executed solved copy (by file name), its
    widgets replaced by snapshots of what they show, and rendered by jupyter-book without executing again.
    The kernel inherits this process's environment, so SIGMA_FAST=1 builds the fast-mode course.
    """
    out = Path(out)
    source_dir = out / "source"
    if source_dir.exists():
        shutil.rmtree(source_dir)
    source_dir.mkdir(parents=True)
    paths = course_notebooks(notebooks_dir)
    for path in tqdm(paths, desc="executing the notebooks", disable=not progress):
        nb = (executed or {}).get(path.name)
        if nb is None:
            nb = execute(solved(read(path)), cwd=source_dir)
        nb = widget_snapshots(nb)
        for cell in nb["cells"]:
            if EXERCISE in tags(cell):
                cell["metadata"]["tags"] = tags(cell) + ["hide-input"]
        write(nb, source_dir / path.name)
    if repository is None and (CHECKOUT / "pyproject.toml").is_file():
        repository = launch.repository_url(CHECKOUT / "pyproject.toml")
    (source_dir / "_config.yml").write_text(BOOK_CONFIG + launch.book_config(repository))
    (source_dir / "intro.md").write_text(BOOK_INTRO)
    toc = ["format: jb-book", "root: intro", "chapters:"] + [f"  - file: {p.stem}" for p in paths]
    (source_dir / "_toc.yml").write_text("\n".join(toc) + "\n")
    command = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
               "build", str(source_dir), "--path-output", str(out), "--warningiserror", "--keep-going"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}):\n{result.stdout[-3000:]}"
                           f"\n{result.stderr[-3000:]}")
    return out / "_build" / "html" / "index.html"
