"""Running the course notebooks in tests: each one once per session, solved, with its exercise probed.

`NotebookRuns.get(path)` executes a notebook through nbmake (fast mode, MPLBACKEND=Agg) and caches the result,
so the notebook tests, the exercise tests and the book test share one execution per notebook. The cache is a
directory that every pytest-xdist worker of the session shares: a lock per notebook makes the first worker that
asks execute it and any other wait for its result, so a notebook runs once however the tests are spread.

What runs is the notebook with its solution in the exercise cell (sigma_ref.teaching.course.solved), plus probe cells
appended at the end: for the stub, two plausible wrong answers (tests/wrong_answers.py) and the solution, each
probe cell defines that answer, calls the notebook's `check_exercise()` and prints one line
`EXERCISE-PROBE {"answer": ..., "outcome": "passed" | "<Exception>: <message>"}`.

Under CPU load nbclient can sit idle for the whole cell timeout on widget cells (jupyter/nbclient#312): it waits
for the shell reply in one long blocking call. `poll_for_reply_in_slices` waits in 1-second slices instead,
until the same deadline, which is the fix proposed in jupyter/nbclient#311.
"""

import asyncio
import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

import nbformat
import pytest
from nbclient.client import NotebookClient, timestamp
from nbclient.exceptions import CellTimeoutError
from nbclient.util import ensure_async
from filelock import FileLock
from nbmake.nb_run import NotebookRun

from sigma_ref.teaching import course
from wrong_answers import WRONG_ANSWERS

POLL_SLICE = 1.0
CELL_TIMEOUT = 600
PROBE_TAG = "exercise-probe"
PROBE_MARK = "EXERCISE-PROBE "


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


def probe_source(name: str, answer: str) -> str:
    return (f"{answer.rstrip()}\n\n\n"
            "import json as _json\n"
            "try:\n"
            "    check_exercise()\n"
            "    _outcome = 'passed'\n"
            "except Exception as _error:\n"
            "    _outcome = f'{type(_error).__name__}: {_error}'\n"
            f"print({PROBE_MARK!r} + _json.dumps({{'answer': {name!r}, 'outcome': _outcome}}))\n")


def probed(nb: dict, stem: str) -> dict:
    """The solved notebook with probe cells for the stub, the wrong answers and the solution appended."""
    (stub,), (solution,) = course.stubs(nb), course.solutions(nb)      # one exercise per notebook
    answers = [("stub", stub)] + [(f"wrong {i + 1}", w) for i, w in enumerate(WRONG_ANSWERS[stem])]
    answers.append(("solution", solution))                            # last: leaves the notebook solved
    out = course.solved(nb)
    out["cells"] += [{"cell_type": "code", "execution_count": None, "id": f"probe-{i}",
                      "metadata": {"tags": [PROBE_TAG]}, "outputs": [], "source": probe_source(name, answer)}
                     for i, (name, answer) in enumerate(answers)]
    return out


@dataclass
class NotebookResult:
    nb: dict                      # the executed notebook, probe cells included
    error: object                 # nbmake's NotebookError, or None
    seconds: float

    def probes(self) -> dict[str, str]:
        """answer name -> outcome, from the probe cells' printed lines."""
        found = {}
        for cell in self.nb["cells"]:
            if PROBE_TAG in course.tags(cell):
                for output in cell.get("outputs", []):
                    for line in "".join(output.get("text", "")).splitlines():
                        if line.startswith(PROBE_MARK):
                            entry = json.loads(line[len(PROBE_MARK):])
                            found[entry["answer"]] = entry["outcome"]
        return found

    def without_probes(self) -> dict:
        out = dict(self.nb)
        out["cells"] = [c for c in self.nb["cells"] if PROBE_TAG not in course.tags(c)]
        return out


class NotebookRuns:
    """Each course notebook executed at most once per test session (see the module's docstring). `workdir` is
    shared by the session's workers: it holds each notebook's executed copy, its result and its lock."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.results: dict[str, NotebookResult] = {}      # this process's copies of the results

    def get(self, path: Path) -> NotebookResult:
        if path.name not in self.results:
            stored = self.workdir / f"{path.name}.result.pickle"
            with FileLock(self.workdir / f"{path.name}.lock"):
                if not stored.exists():
                    stored.write_bytes(pickle.dumps(self._run(path)))
            self.results[path.name] = pickle.loads(stored.read_bytes())
        return self.results[path.name]

    def _run(self, path: Path) -> NotebookResult:
        copy_path = self.workdir / path.name
        course.write(probed(course.read(path), path.stem), copy_path)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(NotebookClient, "_async_poll_for_reply", poll_for_reply_in_slices)
            patch.setenv("SIGMA_FAST", "1")          # the kernel inherits this process's environment
            patch.setenv("MPLBACKEND", "Agg")
            start = time.perf_counter()
            result = NotebookRun(copy_path, default_timeout=CELL_TIMEOUT).execute()
            seconds = time.perf_counter() - start
        return NotebookResult(json.loads(nbformat.writes(result.nb)), result.error, seconds)
