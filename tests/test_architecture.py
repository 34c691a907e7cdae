"""The package's shape: one-way imports, small modules, a light `import sigma_ref`, a wheel that carries its data."""

import ast
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sigma_ref"

# The floors, lowest first. A module may import only modules on LOWER floors (runtime is the ground floor:
# every floor may use it). The core sits below the tooling (lab, teaching, testing), which the core never
# imports; the order is the package map in sigma_ref/__init__.py.
FLOORS = [
    ["checks", "testing.doubles"],
    ["runtime"],
    ["masks", "testing", "testing.hf"],
    ["kernels.layout"],
    ["kernels.reference", "kernels.packed", "kernels.flex", "kernels.flash", "kernels.gate"],
    ["kernels.layer", "kernels.dispatch"],   # one gated layer on the packed path; the dispatcher
    ["kernels.fused"],                 # a whole layer in one call: dispatch + gate + layer
    ["kernels"],
    ["attention"],
    ["moda"],
    ["model"],
    ["data"],
    ["evaluate"],
    ["probes", "optim", "var"],
    ["train"],
    ["viz"],
    ["widgets"],
    # the tooling
    ["hf.flash", "teaching.launch"],
    ["lab", "lab.stats", "lab.runs", "teaching", "teaching.course", "lab.lower_bounds", "hf.convert", "hf.toy"],
    ["lab.experiments", "lab.bench", "hf", "hf.finetune"],
    ["lab.speedrun", "lab.gpucheck", "lab.dilution", "hf.bench"],
    ["lab.report", "lab.var_study"],
    ["__main__"],
]
CORE = {name for level in FLOORS[:FLOORS.index(["widgets"]) + 1] for name in level}
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
# Optional dependencies may be imported inside a function (the only function-local imports allowed).
OPTIONAL = ("flash_attn", "ipywidgets", "IPython", "nbclient", "nbformat", "torch.nn.attention.flex_attention", "torch.nn.attention.varlen")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path):
    """(imported sigma_ref module or external module, is_top_level) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
                for name in names:
                    yield ("sigma_ref", name), id(node) in top_level
            else:
                yield ("external", node.module), id(node) in top_level
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sigma_ref"):
                    yield ("sigma_ref", alias.name[len("sigma_ref."):]), id(node) in top_level
                else:
                    yield ("external", alias.name), id(node) in top_level


def internal(name: str) -> str | None:
    """The module of FLOOR that `name` refers to (a module, or a name inside one)."""
    while name and name not in FLOOR:
        name = name.rpartition(".")[0]
    return name or None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_floor():
    assert {module_name(p) or "__init__" for p in SOURCES} - {"__init__"} == set(FLOOR)


def test_the_top_level_holds_the_core_alone():
    """What a learner reads sits at the top level, at most 14 modules; the tooling lives in subpackages."""
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert len(top) <= 14, sorted(top)
    assert top | {"kernels"} <= CORE and packages == {"kernels", "lab", "teaching", "testing", "hf"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way_and_stay_at_the_top(path):
    me = module_name(path)
    for (kind, name), at_top in imports_of(path):
        if kind == "external":
            assert at_top or name.startswith(OPTIONAL), f"{me}: function-local import of {name} (not optional)"
            continue
        target = internal(name)
        assert at_top, f"{me}: function-local import of sigma_ref.{name}"
        if me == "" or target is None or target == me:     # the package's own __init__ re-exports; names
            continue
        mine = FLOOR[me]
        assert FLOOR[target] < mine or target == "runtime", f"{me} (floor {mine}) imports {target} (floor {FLOOR[target]})"


def test_no_import_circle():
    graph = {module_name(p): {internal(n) for (k, n), _ in imports_of(p) if k == "sigma_ref"} - {None}
             for p in SOURCES}
    graph = {m: deps - {m} for m, deps in graph.items() if m}
    visiting, done = set(), set()

    def visit(node, path):
        assert node not in visiting, f"import circle: {' -> '.join(path + [node])}"
        if node in done:
            return
        visiting.add(node)
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_readable_in_one_sitting(path):
    assert len(path.read_text().splitlines()) <= 400


def test_import_sigma_ref_is_light():
    code = ("import sys, sigma_ref as sr; heavy = [m for m in ('matplotlib', 'ipywidgets', 'IPython', "
            "'sigma_ref.train', 'sigma_ref.viz', 'sigma_ref.hf', 'transformers') if m in sys.modules]; print(heavy); "
            "assert not heavy; sr.viz; assert 'matplotlib' in sys.modules; assert sr.TinyMLLM.__name__ == 'TinyMLLM'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
def test_wheel_carries_the_data_and_works_from_elsewhere(tmp_path):
    """A plain (not editable) install: the wheel carries data/ as package data, found without the source tree."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("sigma_ref-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for split in ("CARD.md", "vocab.json", "test.jsonl", "validation.jsonl", "compositional.jsonl", "text_only.jsonl"):
        assert f"sigma_ref/_data/{split}" in names
    assert "sigma_ref/kernels/packed.py" in names
    # Install it alone into a fresh virtual environment and use it from /tmp. The venv sees this interpreter's
    # packages (torch) through a .pth file naming its site-packages; `--system-site-packages` would not do:
    # it shows the BASE interpreter's packages, which lack torch when the tests themselves run in a venv.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    Path(venv_site, "outer_site_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True)
    elsewhere = dict(cwd=tmp_path, check=True, capture_output=True, text=True)
    location = subprocess.run([python, "-c", "import sigma_ref; print(sigma_ref.__file__)"], **elsewhere).stdout
    assert str(venv) in location, f"the venv imported {location}, not its own install"
    assert "every split matches" in subprocess.run([python, "-m", "sigma_ref", "data", "--check"], **elsewhere).stdout
    forward = ("import sigma_ref as sr; from sigma_ref import data as D; "
               "c = sr.ModelConfig(attn=sr.AttentionConfig(hidden_size=32, num_heads=4), num_layers=1, **D.model_fields()); "
               "m = sr.TinyMLLM(c); "
               "b = D.collate([D.encode(s) for s in D.load_split('test')[:3]]); print(float(m(b).loss))")
    assert float(subprocess.run([python, "-c", forward], **elsewhere).stdout) > 0
