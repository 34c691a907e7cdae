"""Running the course where it is not installed: Colab, Binder, a Jupyter server without the package.

The course is published at one public git URL. What links to it reads the URL from one place, pyproject.toml's
`[project.urls] Repository`, which `python -m sigma_ref publish --repository URL` (course.publish) writes,
together with its copies:

- every notebook's first code cell (`install_cell`) fetches the course and installs its package when
  `import sigma_ref` would fail, and does nothing where it is installed (a checkout; Binder, whose image
  repo2docker builds from environment.yml with the package in it);
- README.md's launch block (`launch_badges`, a generated block `python -m sigma_ref report` also writes): Binder
  and Colab badges;
- the book (course.build_book): jupyter-book's own launch buttons on every notebook page (`book_config`).

Until a URL is published the install cell says how to install the course instead, and there is no badge.

Why a clone and not `pip install git+URL`: the notebooks read the committed results next to the package
(`<checkout>/results`) and keep trained models in `<checkout>/runs`; a clone installed in editable mode has both.
The running kernel cannot see an editable install until it restarts, so the cell also puts the clone on
`sys.path`. Colab opens notebooks from GitHub only, so the URL must be a GitHub repository.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

GITHUB = re.compile(r"https://github\.com/(?P<owner>[\w.-]+)/(?P<repo>[\w.-]+?)(?:\.git)?/?")
CLONE_DIR = "sigma-course"               # where the install cell clones the course, beside the notebook
COLAB, BINDER = "https://colab.research.google.com", "https://mybinder.org"
FIRST_NOTEBOOK = "notebooks/00_the_latte_problem.ipynb"
BRANCH = "main"                          # the branch the badges and the book's buttons open
URLS_TABLE = re.compile(r"^\[project\.urls\]\n(?P<body>(?:(?!\[).*\n?)*)", re.M)   # up to the next [table]
BADGES_BEGIN, BADGES_END = "<!-- launch-badges -->", "<!-- /launch-badges -->"

INSTALL_CELL = '''\
# Colab, Binder, or a Jupyter without the course: fetch it and install its package (where it is, nothing happens).
import importlib.util
import sys

COURSE_REPOSITORY = {repository!r}   # the course's public git URL (python -m sigma_ref publish --repository URL)
if importlib.util.find_spec("sigma_ref") is None:
    if not COURSE_REPOSITORY:
        raise ModuleNotFoundError("sigma_ref is not installed in this Python. In a checkout of the course, start "
                                  "it with `bash course.sh start`, or install it there: pip install -e '.[hf]'")
    !git clone --quiet --depth 1 {{COURSE_REPOSITORY}} {clone}
    %pip install --quiet -e "./{clone}[hf]"
    sys.path.insert(0, "{clone}")                # the running kernel sees the package without a restart'''


def check_repository(repository: str) -> tuple[str, str]:
    """(owner, repo) of a GitHub repository URL; ValueError naming `repository` otherwise."""
    match = GITHUB.fullmatch(repository) if isinstance(repository, str) else None
    if match is None:
        raise ValueError(f"repository must be a GitHub URL https://github.com/OWNER/REPO (Colab opens notebooks "
                         f"from GitHub only), got {repository!r}")
    return match["owner"], match["repo"]


def install_cell(repository: str = "") -> str:
    """The source of every notebook's first code cell, for `repository` ("" before the course is published)."""
    if repository:
        check_repository(repository)
    return INSTALL_CELL.format(repository=repository, clone=CLONE_DIR)


def is_install_cell(cell: dict) -> bool:
    text = "".join(cell.get("source", ""))
    return cell.get("cell_type") == "code" and "COURSE_REPOSITORY = " in text


def repository_url(pyproject: str | Path) -> str | None:
    """The published URL, pyproject.toml's [project.urls] Repository, or None. (Read as text, the line that
    with_repository_url writes: tomllib is Python 3.11's, and the package runs on 3.10.)"""
    table = URLS_TABLE.search(Path(pyproject).read_text())
    found = re.search(r'^Repository = "([^"]*)"', table["body"], re.M) if table else None
    return found[1] if found else None


def launch_links(repository: str, notebook: str = FIRST_NOTEBOOK) -> dict[str, str]:
    """{"colab": URL, "binder": URL} opening `notebook` (a path in the repository) of the published course, on
    its BRANCH."""
    owner, repo = check_repository(repository)
    return {"colab": f"{COLAB}/github/{owner}/{repo}/blob/{BRANCH}/{notebook}",
            "binder": f"{BINDER}/v2/gh/{owner}/{repo}/{BRANCH}?labpath={quote(notebook, safe='')}"}


def with_repository_url(pyproject_text: str, repository: str) -> str:
    """pyproject.toml's text with [project.urls] Repository set (the table added at the end when missing)."""
    check_repository(repository)
    line = f'Repository = "{repository}"'
    table = URLS_TABLE.search(pyproject_text)
    if table is None:
        return pyproject_text.rstrip("\n") + f"\n\n[project.urls]\n{line}\n"
    body = table["body"]
    body = re.sub(r'^Repository = .*$', line, body, count=1, flags=re.M) if re.search(r"^Repository = ", body, re.M) \
        else f"{line}\n{body}"
    return pyproject_text[:table.start("body")] + body + pyproject_text[table.end("body"):]


def with_launch_badges(readme_text: str, repository: str | None) -> str:
    """README.md's text with its launch block (between BADGES_BEGIN and BADGES_END) rewritten."""
    block = re.compile(re.escape(BADGES_BEGIN) + r".*?" + re.escape(BADGES_END), re.S)
    if not block.search(readme_text):
        raise ValueError(f"readme: expected a launch block between {BADGES_BEGIN} and {BADGES_END}")
    return block.sub(lambda _: f"{BADGES_BEGIN}\n{launch_badges(repository)}\n{BADGES_END}", readme_text)


def launch_badges(repository: str | None) -> str:
    """README.md's launch block: Binder (JupyterLab on the whole course, package installed) and Colab (one
    notebook; its first cell installs the course), or a line saying how to publish."""
    if not repository:
        return "Colab and Binder badges appear here once the course is published."
    links = launch_links(repository)
    return (f"[![Open in Binder](https://mybinder.org/badge_logo.svg)]({links['binder']}) "
            f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({links['colab']})")


def book_config(repository: str | None) -> str:
    """jupyter-book's repository and launch-button settings (YAML, to append to _config.yml), or ""."""
    if not repository:
        return ""
    owner, repo = check_repository(repository)                # the theme builds its links from owner/repo
    return (f"repository:\n  url: https://github.com/{owner}/{repo}\n  path_to_book: notebooks\n  branch: {BRANCH}\n"
            f"launch_buttons:\n  notebook_interface: jupyterlab\n  binderhub_url: {BINDER}\n  colab_url: {COLAB}\n")
