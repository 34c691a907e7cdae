"""`bash course.sh start` reaches a running JupyterLab, as root too (containers and this machine kind run as
root, and JupyterLab refuses root without --allow-root)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_course_start_serves_jupyterlab():
    port = free_port()
    server = subprocess.Popen(["bash", "course.sh", "start", "--no-browser", f"--port={port}",
                               "--ServerApp.token=course-test"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, status = time.time() + 240, None
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token=course-test", timeout=5) as reply:
                    status = reply.status
                    break
            except OSError:
                time.sleep(1)
        output = "" if server.poll() is None else server.stdout.read()
        assert status == 200, f"JupyterLab did not answer (running as uid {os.getuid()}); course.sh said:\n{output[-2000:]}"
        # The notebooks' kernel is the course's interpreter, not whatever `python` is first on PATH.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token=course-test", timeout=10) as reply:
            spec = json.load(reply)["kernelspecs"]["python3"]["spec"]
        assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve(), spec["argv"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
