#!/usr/bin/env bash
# The SIGMA course's two commands, each doing all set-up it needs on a fresh machine:
#
#   bash course.sh start    install (if needed) and open the course in JupyterLab
#   bash course.sh test     install (if needed) and run every test: unit, notebooks, browser
#   bash course.sh book     install (if needed), execute the notebooks and build the course as a static site
#                           in build/book/ (ignored by git); open build/book/_build/html/index.html
#
# Set-up installs into the Python that runs this script (activate a venv or the conda environment from
# environment.yml first if you want it isolated); an externally managed system Python gets its own .venv. It keeps a torch that is already installed; otherwise it
# installs torch==2.13.0, which on the course's CPU machines is a local CPU wheel (an unpinned torch would
# download several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# PEP 668: a stock Debian or Ubuntu python3 refuses `pip install` outside a virtual environment. Then, and only
# when no virtual or conda environment is active, the course makes its own in .venv and reuses it next time.
if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))' 2>/dev/null; then
    if [ ! -x .venv/bin/python ]; then
        echo "[course] $PYTHON is externally managed (PEP 668): making a virtual environment in .venv"
        "$PYTHON" -m venv .venv
    fi
    PYTHON=.venv/bin/python
fi

setup() {
    if ! "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "[course] installing torch==2.13.0"
        "$PYTHON" -m pip install --quiet torch==2.13.0
    fi
    echo "[course] installing sigma_ref with its dev and hf extras (keeps the installed torch)"
    # uv installs the same packages as pip (same versions, checked side by side) in about 11 s where pip takes
    # about 140 s here (and in a second or two when nothing changed); pip is the fallback wherever uv cannot be
    # installed or refuses the environment.
    if ! { "$PYTHON" -m pip install --quiet uv >/dev/null 2>&1 &&
           "$PYTHON" -m uv pip install --quiet --python "$PYTHON" -e ".[dev,hf]"; }; then
        "$PYTHON" -m pip install --quiet -e ".[dev,hf]"
    fi
    # The notebooks' kernel ("python3") is registered for THIS interpreter (an absolute path, in its own
    # prefix), so JupyterLab runs them with the Python that has the course installed, not with whatever
    # `python` comes first on PATH.
    "$PYTHON" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (SIGMA course)" >/dev/null
}

setup_browser() {
    # The browser test drives Debian's chromium (Playwright's own browser download needs the internet).
    if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[course] installing Debian's chromium for the browser test"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
}

case "${1:-}" in
    start)
        setup
        shift
        # JupyterLab refuses to run as root (containers, cloud notebooks) unless told that it is meant.
        root=()
        if [ "$(id -u)" = 0 ]; then root=(--allow-root); fi
        exec "$PYTHON" -m jupyterlab --ip=127.0.0.1 "${root[@]}" notebooks/00_the_latte_problem.ipynb "$@"
        ;;
    test)
        setup
        setup_browser
        shift
        # Tests run in parallel, one pytest-xdist worker per core (at most 4); tests/conftest.py groups them
        # (each file's tests on one worker, each notebook a group of its own). `bash course.sh test -n 0` runs
        # them in one process.
        exec "$PYTHON" -m pytest -n auto --maxprocesses 4 --dist loadgroup --no-loadscope-reorder "$@"
        ;;
    book)
        setup
        shift
        exec "$PYTHON" -m sigma_ref book "$@"
        ;;
    *)
        echo "usage: bash course.sh {start|test|book} [extra arguments for jupyter lab / pytest / the book]" >&2
        exit 2
        ;;
esac
