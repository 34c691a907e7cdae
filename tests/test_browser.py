"""JupyterLab in a real browser: the widget notebooks open, run, and their widgets respond.

Starts JupyterLab on 127.0.0.1 with a token on solved COPIES of the notebooks (autosave writes to what it opens),
drives Debian's chromium with Playwright, runs every cell of the head-split notebook (02) and the bias
notebook (03), checks that no cell shows an error, moves a slider in each and checks ON THE PIXELS that the
figure changed. Screenshots go to artifacts/browser/. Afterwards no server, kernel or browser process of the
test is left, and the committed notebooks are unchanged.

Facts this relies on (shared/DESIGN.md): Playwright's own browser download needs the internet, Debian's
chromium works; "No Kernel" also reports idle, so wait for a real kernel name; ipywidgets 8 sliders are
noUiSlider (`.noUi-handle`, moved with arrow keys) with the value in `.widget-readout`.
"""

import hashlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sigma_ref.teaching import course

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_TIMEOUT_S = int(os.environ.get("SIGMA_BROWSER_RUN_TIMEOUT", "300"))

pytestmark = pytest.mark.browser

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium; the browser test must run",
                    pytrace=False)
    pytest.skip(f"{CHROMIUM} not found (install Debian's chromium: apt-get install chromium); "
                "the browser test runs wherever it is present and always in CI", allow_module_level=True)

sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
Image = pytest.importorskip("PIL.Image")


def notebooks_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (our temporary directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """A JupyterLab server on a copy of the notebooks; yields (base_url, token); leaves nothing behind."""
    before = notebooks_digest()
    root = tmp_path_factory.mktemp("sigma-lab")
    marker = str(root)
    # Solved copies (sigma_ref.teaching.course.solved): Run All must reach the end, and a stub stops it at the check.
    (root / "notebooks").mkdir()
    for path in course.course_notebooks(ROOT / "notebooks"):
        course.write(course.solved(course.read(path)), root / "notebooks" / path.name)
    # What a class gets: stubs, no solutions (nbgrader's release of these is tested equal in test_notebooks.py).
    (root / "notebooks" / "learner").mkdir()
    for path in course.course_notebooks(ROOT / "notebooks"):
        course.write(course.learner_copy(course.read(path)), root / "notebooks" / "learner" / path.name)
    settings = root / "settings"
    # No news / update prompt, and every cell in the DOM (no virtual scrolling) so the test can read them.
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    token, port = secrets.token_hex(16), free_port()
    # MPLBACKEND=Agg, as headless servers and CI images often export it: the widget panels must still show
    # their figures (they once showed only "<Figure ...>" under Agg).
    env = dict(os.environ, SIGMA_FAST="1", MPLBACKEND="Agg", JUPYTER_RUNTIME_DIR=str(root / "runtime"),
               JUPYTER_CONFIG_DIR=str(root / "config"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"))
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root / 'notebooks'}",
               "--LabApp.extension_manager=readonly", f"--LabApp.workspaces_dir={root / 'workspaces'}",
               f"--LabApp.user_settings_dir={settings}", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(root / "server.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"JupyterLab did not start:\n{(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield base, token, marker
    finally:
        try:                                      # shut kernels and server down cleanly first
            request = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(request, timeout=10)
            server.wait(timeout=20)
        except Exception:
            pass
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
        deadline = time.monotonic() + 15
        while processes_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = processes_mentioning(marker)
        assert leftover == [], f"processes left behind: {leftover}"
        assert notebooks_digest() == before, "the committed notebooks changed during the browser test"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_and_run_all(browser, jupyterlab, notebook: str):
    """Open a notebook in JupyterLab, wait for its kernel, Run All, wait until every cell has run."""
    base, token, _ = jupyterlab
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{base}/lab/tree/{notebook}?reset&token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    # "No Kernel" also reports idle: wait for the real kernel's name and no open dialog.
    try:
        page.wait_for_function("() => [...document.querySelectorAll('.jp-Toolbar-kernelName')]"
                               ".some(e => e.textContent.includes('Python 3'))", timeout=60_000)
    except Exception:
        names = page.eval_on_selector_all(".jp-Toolbar-kernelName", "els => els.map(e => e.textContent)")
        log = (Path(jupyterlab[2]) / "server.log").read_text()[-2000:]
        raise AssertionError(f"{notebook}: the notebook's Python 3 kernel did not start within 60 s (kernel shown: "
                             f"{names}); the server's log ends with:\n{log}") from None
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    assert page.locator(".jp-Dialog").count() == 0
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    try:
        page.wait_for_function(
            """() => {
                const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
                // a collapsed (hidden-input) cell shows an empty prompt; pending cells show [ ] or [*]
                return prompts.some(p => p !== '') && prompts.every(p => p === '' || /^\\[\\d+\\]:$/.test(p));
            }""", timeout=RUN_TIMEOUT_S * 1000, polling=500)
    except Exception:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"failed_{notebook}.png"), full_page=True)
        prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent)")
        raise AssertionError(f"{notebook}: not every cell ran; prompts {prompts}; errors {cell_errors(page)}")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    return page


def cell_errors(page) -> list[str]:
    """Text of every output that shows an error (JupyterLab renders tracebacks as stderr-type output)."""
    texts = page.eval_on_selector_all(".jp-OutputArea-output", "els => els.map(e => e.innerText)")
    return [t[:300] for t in texts if "Traceback" in t or "Error:" in t.split("\n")[0]]


def image_bytes(locator) -> bytes:
    locator.scroll_into_view_if_needed()
    return locator.screenshot()


def changed_fraction(png_a: bytes, png_b: bytes) -> float:
    """Fraction of pixels that differ between two screenshots of the same element."""
    a = Image.open(io.BytesIO(png_a)).convert("RGB")
    b = Image.open(io.BytesIO(png_b)).convert("RGB").resize(a.size)
    difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=-1)
    return float((difference > 16).mean())


def move_slider(page, index: int, key: str, presses: int, expected_readout: str):
    handle = page.locator(".noUi-handle").nth(index)
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(presses):
        handle.press(key)
    readout = page.locator(".widget-readout").nth(index)
    page.wait_for_function("([el, value]) => el.textContent.trim().replace('\\u2212', '-') === value",
                           arg=[readout.element_handle(), expected_readout], timeout=30_000)


def wait_for_new_figure(page, output, before: bytes) -> bytes:
    """The panel redraws asynchronously: poll the figure until its pixels change (or time out)."""
    from playwright.sync_api import Error as PlaywrightError

    after, deadline = before, time.monotonic() + 60
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        try:
            after = image_bytes(output.locator("img").first)
        except PlaywrightError:          # the Output widget is swapping its image right now: look again
            continue
        if changed_fraction(before, after) > 0.005:
            return after
    return after


def test_head_split_notebook_runs_and_its_slider_redraws_the_masks(browser, jupyterlab):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = open_and_run_all(browser, jupyterlab, "02_split_heads.ipynb")
    assert cell_errors(page) == []
    output = page.locator(".widget-output").first
    before = image_bytes(output.locator("img").first)
    readout = page.locator(".widget-readout").first.inner_text().strip()
    assert readout == "4"
    output.screenshot(path=str(SCREENSHOTS / "head_split_before.png"))
    move_slider(page, 0, "ArrowLeft", 3, "1")
    after = wait_for_new_figure(page, output, before)
    output.screenshot(path=str(SCREENSHOTS / "head_split_after.png"))
    page.screenshot(path=str(SCREENSHOTS / "jupyterlab_head_split.png"))
    assert changed_fraction(before, after) > 0.005, "moving the head-split slider did not change the mask figure"
    assert "intra_change = 0" in output.inner_text()
    assert cell_errors(page) == []
    page.close()


def test_bias_notebook_runs_and_its_sliders_redraw_the_gates(browser, jupyterlab):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = open_and_run_all(browser, jupyterlab, "03_gates.ipynb")
    assert cell_errors(page) == []
    output = page.locator(".widget-output").first
    before = image_bytes(output.locator("img").first)
    readout = page.locator(".widget-readout").nth(2).inner_text().strip().replace("\u2212", "-")
    assert readout == "-1.00"                                       # B[global][text]; ipywidgets prints U+2212
    move_slider(page, 2, "ArrowRight", 6, "2.00")
    after = wait_for_new_figure(page, output, before)
    output.screenshot(path=str(SCREENSHOTS / "bias_after.png"))
    page.screenshot(path=str(SCREENSHOTS / "jupyterlab_bias.png"))
    assert changed_fraction(before, after) > 0.005, "moving a bias slider did not change the gate figure"
    assert cell_errors(page) == []
    page.close()


def test_learner_copy_stops_at_the_stub_with_its_hint(browser, jupyterlab):
    """A learner's Run All on a fresh copy: every cell runs, and the check fails on the stub with its hint."""
    page = open_and_run_all(browser, jupyterlab, "learner/00_the_latte_problem.ipynb")
    errors = cell_errors(page)
    assert len(errors) == 1 and "NotImplementedError" in errors[0], errors
    outputs = page.eval_on_selector_all(".jp-OutputArea-output", "els => els.map(e => e.innerText.trim())")
    (traceback,) = [o for o in outputs if "NotImplementedError" in o]
    assert "NotImplementedError: write image_share(k, m, delta). Hint:" in traceback
    assert "correct" not in outputs
    page.close()
