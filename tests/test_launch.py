"""Running the course where it is not installed (teaching/launch.py): the install cell, publish, the badges."""

import importlib.util
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from sigma_ref import __main__ as cli
from sigma_ref.teaching import course, launch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = course.course_notebooks(ROOT / "notebooks")
URL = "https://github.com/example-school/sigma-course"


def test_every_notebook_starts_with_the_install_cell_as_generated():
    """One source for the cell (launch.INSTALL_CELL), one URL (pyproject.toml) copied into every notebook and the
    README: a hand edit to any copy fails here."""
    published = launch.repository_url(ROOT / "pyproject.toml") or ""
    for path in NOTEBOOKS:
        cells = course.read(path)["cells"]
        assert cells[0]["cell_type"] == "markdown" and launch.is_install_cell(cells[1]), path.name
        assert sum(launch.is_install_cell(c) for c in cells) == 1, path.name
        assert course.source(cells[1]) == launch.install_cell(published), path.name
    readme = (ROOT / "README.md").read_text()
    assert launch.with_launch_badges(readme, published or None) == readme


class RecordingShell:
    """get_ipython() for a cell run outside Jupyter: records `!` commands and `%` magics, expanded as IPython
    expands them ({name} from the user namespace)."""

    def __init__(self, namespace):
        self.namespace, self.calls = namespace, []

    def system(self, command):
        self.calls.append(("!", command.format(**self.namespace)))

    def run_line_magic(self, name, line):
        self.calls.append((f"%{name}", line.format(**self.namespace)))


def run_install_cell(repository, installed, monkeypatch):
    """Execute the install cell as IPython would (its ! and % lines transformed), with sigma_ref installed or
    not; returns the shell commands it ran and the sys.path it left."""
    code = TransformerManager().transform_cell(launch.install_cell(repository))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: find_spec(name, *a) if installed or name != "sigma_ref" else None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {}
    shell = RecordingShell(namespace)
    namespace["get_ipython"] = lambda: shell
    exec(compile(code, "install-cell", "exec"), namespace)
    return shell.calls, sys.path


def test_the_install_cell_does_nothing_where_the_course_is_installed(monkeypatch):
    for repository in ("", URL):
        calls, path = run_install_cell(repository, True, monkeypatch)
        assert calls == [] and launch.CLONE_DIR not in path


def test_the_install_cell_clones_installs_and_imports_where_the_course_is_missing(monkeypatch):
    calls, path = run_install_cell(URL, False, monkeypatch)
    assert calls == [("!", f"git clone --quiet --depth 1 {URL} sigma-course"),
                     ("%pip", 'install --quiet -e "./sigma-course[hf]"')]
    assert path[0] == "sigma-course"                   # the clone's package imports in the running kernel


def test_the_unpublished_install_cell_says_how_to_install(monkeypatch):
    with pytest.raises(ModuleNotFoundError, match=r"bash course.sh start.*pip install -e '\.\[hf\]'"):
        run_install_cell("", False, monkeypatch)


def checkout_copy(tmp_path) -> Path:
    root = tmp_path / "course"
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns(".*"))
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    return root


def test_publish_writes_the_url_wherever_the_course_links_to_itself(tmp_path):
    root = checkout_copy(tmp_path)
    for url in (URL, "https://github.com/another/fork.git"):                # republishing replaces
        written = course.publish(url, root)
        assert len(written) == len(NOTEBOOKS) + 2
        assert launch.repository_url(root / "pyproject.toml") == url
        assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"] == "sigma_ref"
        for path in course.course_notebooks(root / "notebooks"):
            cell, = [c for c in course.read(path)["cells"] if launch.is_install_cell(c)]
            assert course.source(cell) == launch.install_cell(url)
        readme = (root / "README.md").read_text()
        assert readme.count(launch.BADGES_BEGIN) == 1 and readme.count("colab-badge.svg") == 1
    owner_repo = "another/fork"
    assert (f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/00_the_latte_problem.ipynb)"
            in readme)
    assert f"(https://mybinder.org/v2/gh/{owner_repo}/main?labpath=notebooks%2F00_the_latte_problem.ipynb)" in readme


def test_the_publish_command_writes_the_checkout_it_is_given(tmp_path, capsys):
    root = checkout_copy(tmp_path)
    before = (ROOT / "pyproject.toml").read_text()
    cli.main(["publish", "--repository", URL, "--root", str(root)])
    assert launch.repository_url(root / "pyproject.toml") == URL
    assert f"published at {URL}" in capsys.readouterr().out
    assert (ROOT / "pyproject.toml").read_text() == before                   # the real checkout untouched


@pytest.mark.parametrize("url", ["https://gitlab.com/a/b", "http://github.com/a/b", "https://github.com/a",
                                 "github.com/a/b", None])
def test_publish_takes_only_a_github_repository_and_writes_nothing_otherwise(tmp_path, url):
    root = checkout_copy(tmp_path)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"repository must be a GitHub URL https://github.com/OWNER/REPO.*got"):
        course.publish(url, root)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_publish_refuses_a_notebook_without_its_install_cell_before_writing(tmp_path):
    root = checkout_copy(tmp_path)
    path = root / "notebooks" / NOTEBOOKS[3].name
    nb = course.read(path)
    nb["cells"] = [c for c in nb["cells"] if not launch.is_install_cell(c)]
    course.write(nb, path)
    with pytest.raises(ValueError, match=rf"{path.name} has 0 install cells"):
        course.publish(URL, root)
    assert launch.repository_url(root / "pyproject.toml") is None


def test_the_book_config_gets_jupyter_books_launch_buttons_only_when_published():
    assert launch.book_config(None) == ""
    assert f"url: {URL}\n" in launch.book_config(URL + ".git")          # the theme's links need no .git
    config = launch.book_config(URL)
    assert f"url: {URL}" in config and "path_to_book: notebooks" in config
    assert "colab_url: https://colab.research.google.com" in config and "binderhub_url: https://mybinder.org" in config


@pytest.mark.parametrize("urls_table", ["", '[project.urls]\nHomepage = "h"\n\n',
                                        '[project.urls]\nRepository = "https://github.com/old/one"\n'
                                        'Homepage = "h"\n\n'])
def test_the_url_goes_into_project_urls_and_nowhere_else(tmp_path, urls_table):
    """Written into [project.urls] (added, extended or updated), read back from there, another table's
    Repository key untouched; the file stays valid TOML."""
    text = (ROOT / "pyproject.toml").read_text().replace(
        "[project.scripts]", urls_table + '[tool.other]\nRepository = "keep"\n\n[project.scripts]')
    path = tmp_path / "pyproject.toml"
    path.write_text(launch.with_repository_url(text, URL))
    parsed = tomllib.loads(path.read_text())
    assert parsed["project"]["urls"]["Repository"] == URL and parsed["tool"]["other"]["Repository"] == "keep"
    assert ("Homepage" in parsed["project"]["urls"]) == bool(urls_table)
    assert launch.repository_url(path) == URL
