"""Every course notebook runs top to bottom (fast mode) through nbmake, and is committed clean.

Two facts about headless notebook runs shape this file (see shared/DESIGN.md):
- nbmake / nbclient execute every cell but never move a widget, and an exception inside a widget callback
  does not fail the run. The panels in sigma_ref.widgets put such an exception into their Output widget as
  an error output, and `output_widget_errors` below fails the test if any Output widget holds one.
- Under CPU load nbclient can sit idle for the whole cell timeout on widget cells (jupyter/nbclient#312):
  it waits for the shell reply in one long blocking call. `poll_for_reply_in_slices` waits in 1-second
  slices instead, until the same deadline, which is the fix proposed in jupyter/nbclient#311.
"""

import asyncio
import json
import re
import time
from pathlib import Path
from queue import Empty

import nbformat
import pytest
from nbclient.client import NotebookClient, timestamp
from nbclient.exceptions import CellTimeoutError
from nbclient.util import ensure_async
from nbmake.nb_run import NotebookRun

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
POLL_SLICE = 1.0
CELL_TIMEOUT = 600


async def poll_for_reply_in_slices(self, msg_id, cell, timeout, task_poll_output_msg, task_poll_kernel_alive):
    """nbclient's _async_poll_for_reply, waiting for the shell reply in short slices up to the deadline."""
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out_reply = None
    while True:
        try:
            if timed_out_reply:
                msg = timed_out_reply
                msg["parent_header"] = {"msg_id": msg_id}
            else:
                msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=POLL_SLICE))
            if msg["parent_header"].get("msg_id") == msg_id:
                if self.record_timing:
                    cell["metadata"]["execution"]["shell.execute_reply"] = timestamp(msg)
                try:
                    await asyncio.wait_for(task_poll_output_msg, self.iopub_timeout)
                except (asyncio.TimeoutError, Empty):
                    if self.raise_on_iopub_timeout:
                        task_poll_kernel_alive.cancel()
                        raise CellTimeoutError.error_from_timeout_and_cell(
                            "Timeout waiting for IOPub output", self.iopub_timeout, cell) from None
                    self.log.warning("Timeout waiting for IOPub output")
                task_poll_kernel_alive.cancel()
                return msg
        except Empty:
            if deadline is not None and time.monotonic() >= deadline:
                task_poll_kernel_alive.cancel()
                await self._async_check_alive()
                timed_out_reply = await self._async_handle_timeout(timeout, cell)


@pytest.fixture
def sliced_polling(monkeypatch):
    monkeypatch.setattr(NotebookClient, "_async_poll_for_reply", poll_for_reply_in_slices)


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
def test_notebook_runs_in_fast_mode(path, sliced_polling, monkeypatch, record_property):
    monkeypatch.setenv("SIGMA_FAST", "1")          # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    start = time.perf_counter()
    result = NotebookRun(path, default_timeout=CELL_TIMEOUT).execute()
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    print(f"{path.name}: {seconds:.1f} s")
    if result.error is not None:
        pytest.fail(f"{path.name} failed in cell {result.error.failing_cell_index}:\n{result.error.trace}")
    assert output_widget_errors(result.nb) == []
    # Cells that show text must not show a traceback either (e.g. a caught exception printed by a panel).
    for cell in result.nb.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", f"{path.name}: {output.get('ename')}"


def test_there_are_nine_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(9)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs_or_widget_state(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} has outputs"
    assert "widgets" not in nb["metadata"], f"{path.name} stores widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    """Starts with what the learner will be able to do; ends with a summary and a checked exercise."""
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "you will be able to" in first.source.lower()
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert any(re.search(r"^## Summary", s, re.M) for s in markdown), f"{path.name}: no summary"
    assert any(re.search(r"^## Exercise", s, re.M) for s in markdown), f"{path.name}: no exercise"
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert solutions and all(c.metadata.get("jupyter", {}).get("source_hidden") for c in solutions)
    assert "check_exercise" in nb.cells[-1].source or any("check" in c.metadata.get("tags", []) for c in nb.cells)
    assert "import sigma_ref" in "".join(c.source for c in nb.cells if c.cell_type == "code")
