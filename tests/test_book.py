"""The rendered course (`bash course.sh book`): every notebook's page exists and shows its figures in a browser.

The big test builds the book from the notebooks this session already executed (tests/notebook_runs.py), so the
course runs once per test session; a small one lets the builder execute a notebook itself.
"""

import os
from pathlib import Path

import pytest

from sigma_ref.teaching import course, launch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = course.course_notebooks(ROOT / "notebooks")
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [pytest.mark.notebook, pytest.mark.browser]


def image_outputs(nb: dict) -> int:
    """Figures a static page can show: image outputs of the notebook's cells (not those inside live widgets)."""
    return sum("image/png" in output.get("data", {}) for cell in nb["cells"] for output in cell.get("outputs", []))


@pytest.fixture(scope="module")
def chromium_page():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium", pytrace=False)
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser.new_page(viewport={"width": 1300, "height": 900})
        finally:
            browser.close()


def loaded_images(page) -> int:
    """Images in the page's article that the browser decoded (a missing file has naturalWidth 0)."""
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=30_000)
    return page.eval_on_selector_all("article img, main img", "els => els.filter(i => i.naturalWidth > 0).length")


def test_book_shows_every_notebook_with_its_figures(notebook_runs, chromium_page, tmp_path):
    executed = {}
    for path in NOTEBOOKS:
        result = notebook_runs.get(path)
        assert result.error is None, f"{path.name} did not run (see its notebook test)"
        executed[path.name] = result.without_probes()
    index = course.build_book(tmp_path / "book", ROOT / "notebooks", executed=executed, progress=False)
    assert index.is_file()
    page = chromium_page
    page.goto(index.as_uri(), wait_until="load")                  # index.html forwards to the intro page
    page.wait_for_url("**/intro.html")
    links = page.eval_on_selector_all("nav a", "els => els.map(e => e.getAttribute('href'))")
    for path in NOTEBOOKS:
        assert any(link and link.endswith(f"{path.stem}.html") for link in links), f"no link to {path.stem}"
        page.goto((index.parent / f"{path.stem}.html").as_uri(), wait_until="domcontentloaded")
        title = course.source(executed[path.name]["cells"][0]).splitlines()[0].lstrip("# ").strip()
        assert title.split(" ")[0] in page.title(), (page.title(), title)
        expected = image_outputs(course.read(tmp_path / "book" / "source" / path.name))
        shown = loaded_images(page)
        assert shown >= expected, f"{path.stem}: the page shows {shown} figures, the notebook has {expected}"
        # the exercise's solution is in the page, collapsed behind a toggle, and its check printed "correct"
        assert page.locator(".tag_exercise").count() == 1, path.stem
        assert "correct" in page.locator(".tag_check").inner_text()
        # a notebook that draws shows its figures (inline even though the run exported MPLBACKEND=Agg); the
        # widget panels as snapshots
        code = "".join(course.source(c) for c in executed[path.name]["cells"] if c["cell_type"] == "code")
        if "_figure(" in code or "plt." in code or "_panel(" in code:
            assert expected >= 1, f"{path.stem} draws figures but its page has none"


def test_book_builder_executes_notebooks_itself(chromium_page, tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    source = ROOT / "notebooks" / "00_the_latte_problem.ipynb"
    (notebooks / source.name).write_bytes(source.read_bytes())
    monkeypatch.setenv("SIGMA_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    repository = "https://github.com/example-school/sigma-course"        # as `python -m sigma_ref publish` sets it
    index = course.build_book(tmp_path / "book", notebooks, progress=False, repository=repository)
    page = chromium_page
    page.goto((index.parent / f"{source.stem}.html").as_uri(), wait_until="domcontentloaded")
    assert loaded_images(page) >= 1
    assert "correct" in page.locator(".tag_check").inner_text()
    # jupyter-book's own launch buttons open this notebook of the published repository in Colab and Binder
    links = page.eval_on_selector_all("a", "els => els.map(e => e.href)")
    for launch_link in launch.launch_links(repository, f"notebooks/{source.name}").values():
        host = launch_link.split("?")[0]
        assert any(link.startswith(host) for link in links), (host, [l for l in links if "colab" in l or "binder" in l])
