"""The project's own files agree with each other: environment.yml, pyproject.toml, README, CI."""

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] and "pip" in env["dependencies"]
    assert any(str(dep).startswith("python=3.11") for dep in env["dependencies"] if isinstance(dep, str))
    pip_section = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert "torch==2.13.0" in pip_section, "the conda env must pin the CPU wheel, as CI does"
    assert "-e .[dev]" in pip_section
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    named = {requirement_name(r) for r in pip_section if not r.startswith("-e")}
    assert wanted == named, f"only in pyproject: {wanted - named}; only in environment.yml: {named - wanted}"


def test_gpu_extra_is_flash_attn_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [requirement_name(r) for r in project["optional-dependencies"]["gpu"]] == ["flash-attn"]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text)
    assert match, f"README.md has no <!-- {marker} --> block"
    return match.group(1).strip()


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    assert readme_command("start-command") == "bash course.sh start"
    assert readme_command("test-command") == "bash course.sh test"
    ci = (ROOT / ".ci" / "run").read_text()
    extracted = subprocess.run(
        ["bash", "-c", re.search(r"test_command=\$\((.+)\)\n", ci).group(1)],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == readme_command("test-command")


def test_ci_installs_the_cpu_torch_and_keeps_an_installed_one():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'import torch' in ci and "torch==2.13.0" in ci
    assert "chromium" in ci


def readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S)
    assert match, f"README.md has no {name} block"
    return match.group(1).strip()


def test_readme_compare_table_is_the_committed_run():
    results_md = (ROOT / "results" / "cpu" / "results.md").read_text()
    table = "\n".join(line for line in results_md.splitlines() if line.startswith("|"))
    assert readme_block("compare-table") == table


def test_readme_bench_tables_are_the_committed_benchmark():
    from sigma_ref.bench import Table

    results = json.loads((ROOT / "results" / "bench_cpu.json").read_text())
    rendered = "\n\n".join(Table(t["title"], t["columns"], t["rows"]).markdown() for t in results["tables"])
    assert readme_block("bench-tables") == rendered


@pytest.mark.parametrize("block, path", [("speedrun-log", "speedrun_log_cpu.json"),
                                         ("time-to-accuracy", "time_to_accuracy_cpu.json")])
def test_readme_speedrun_tables_are_the_committed_runs(block, path):
    from sigma_ref.bench import Table

    results = json.loads((ROOT / "results" / path).read_text())
    rendered = "\n\n".join(Table(t["title"], t["columns"], t["rows"]).markdown() for t in results["tables"])
    assert readme_block(block) == rendered


def test_readme_dilution_tables_are_the_committed_run():
    committed = [line for line in (ROOT / "results" / "dilution" / "results.md").read_text().splitlines() if line.startswith("|")]
    assert [line for line in readme_block("dilution-tables").splitlines() if line.startswith("|")] == committed


def test_readme_dilution_claims_match_the_committed_run():
    from sigma_ref import dilution

    metrics, counts = dilution.load_metrics(ROOT / "results" / "dilution")
    assert counts == (0, 8, 16, 32, 64, 128) and {m["seed"] for m in metrics} == {0, 1, 2}
    runs = lambda mix, variant: [m for m in metrics if m["train_mix"] == mix and m["variant"] == variant]
    mean = lambda mix, variant, key: sum(key(m) for m in runs(mix, variant)) / 3
    accuracy = lambda kind, n: (lambda m: m["accuracy"][kind][str(n)])
    mixed = "irrelevant images"
    assert [round(mean("text only", a, accuracy("blank", 16)), 2) for a in ("standard", "sigma", "gated")] == [0.12, 0.19, 0.22]
    assert round(max(mean("text only", a, accuracy("noise", 64)) for a in ("standard", "gated", "sigma")), 3) == 0.002
    assert round(min(mean(mixed, a, accuracy(kind, n)) for a in ("standard", "gated", "sigma") for kind in ("blank", "noise")
                     for n in (8, 16)), 3) == 0.998
    assert [round(mean(mixed, a, accuracy("blank", 64)), 2) for a in ("sigma", "standard", "gated")] == [0.87, 0.41, 0.56]
    assert all(accuracy(kind, n)(m) == 1.0 for m in runs(mixed, "sigma") for kind in ("noise",) for n in (64, 128))
    assert [round(mean(mixed, a, accuracy("noise", n)), 2) for a in ("standard", "gated") for n in (64, 128)] == [0.98, 0.8, 0.8, 0.46]
    caption = lambda m: m["caption_exact_match"]
    assert [round(mean(mixed, a, caption), 3) for a in ("sigma", "standard", "gated")] == [0.967, 0.972, 0.972]
    assert [round(mean(mixed, v, accuracy("blank", 64)), 2) for v in ("0 intra heads", "1 intra head", "sigma", "3 intra heads")] \
        == [0.52, 0.84, 0.87, 0.97]
    assert [round(mean(mixed, v, accuracy("blank", 64)), 2) for v in ("gates off", "stream bias off", "bias init 0")] == [0.79, 0.92, 0.83]
    sigma_seeds = [accuracy("blank", 64)(m) for m in runs(mixed, "sigma")]
    assert round(min(sigma_seeds), 2) == 0.65 and max(sigma_seeds) == 1.0
    variants = [v for v in dilution.ABLATIONS if v != "sigma"]
    assert [round(x, 2) for x in sorted(mean(mixed, v, accuracy("noise", 128)) for v in variants)][::len(variants) - 1] == [0.57, 0.96]


def test_readme_claims_match_the_committed_run():
    results = json.loads((ROOT / "results" / "cpu" / "results.json").read_text())
    runs = results["runs"]
    mean = lambda attention, key: sum(r[key] for r in runs[attention]) / len(runs[attention])
    assert [round(mean(a, "caption_exact_match"), 3) for a in ("standard", "gated", "sigma")] == [0.971, 0.976, 0.977]
    caption = sorted(r["caption_exact_match"] for rs in runs.values() for r in rs)
    assert caption[0] == 0.938 and runs["standard"][2]["caption_exact_match"] == 0.938 and runs["standard"][2]["steps"] == 400
    assert 0.97 <= caption[1] <= caption[-1] <= 0.99
    assert all(r["target_reached"]["exact_match"] >= 0.97 for rs in runs.values() for r in rs)
    assert {r["steps"] for rs in runs.values() for r in rs} == {400, 450, 500, 550} and all(r["threads"] == 1 for rs in runs.values() for r in rs)
    assert [round(100 * mean(a, "compositional_exact_match")) for a in ("standard", "gated", "sigma")] == [59, 49, 50]
    compositional = {a: [round(100 * r["compositional_exact_match"]) for r in rs] for a, rs in runs.items()}
    assert (min(compositional["standard"]), max(compositional["standard"])) == (56, 61)
    assert (min(compositional["gated"]), max(compositional["gated"]), min(compositional["sigma"]), max(compositional["sigma"])) == (33, 60, 45, 60)
    seconds = sorted(r["train_seconds"] for rs in runs.values() for r in rs)
    assert round(seconds[0]) == 25 and round(seconds[-1]) == 38
    noise, blank = ({a: [r["dilution"][kind]["64"] for r in rs] for a, rs in runs.items()} for kind in ("noise", "blank"))
    assert max(max(v) for v in noise.values()) == 0
    assert max(blank["standard"]) <= 0.015 and max(blank["gated"]) <= 0.1 and 0.05 <= min(blank["sigma"]) <= max(blank["sigma"]) <= 0.205
    assert sum(blank["sigma"]) > max(sum(blank["standard"]), sum(blank["gated"]))       # a little more on average
    assert round(min(r["text_only_accuracy"] for rs in runs.values() for r in rs), 3) == 0.997


def test_readme_speedrun_claims_match_the_committed_runs():
    log = json.loads((ROOT / "results" / "speedrun_log_cpu.json").read_text())["tables"][0]["rows"]
    assert [round(row[1]) for row in log] == [174, 93, 39, 39, 42, 37, 36]
    assert [row[5] for row in log] == [1750, 800, 800, 650, 700, 600, 550]
    assert log[2][4] == "1/3" and all(row[4] == "3/3" for row in log[3:])
    threads, tta = (t["rows"] for t in json.loads((ROOT / "results" / "time_to_accuracy_cpu.json").read_text())["tables"])
    assert [round(row[3], 2) for row in threads] == [1.0, 1.05, 1.25, 3.05]
    assert [round(row[1]) for row in tta] == [30, 30, 34] and all(row[4] == "3/3" for row in tta)
    assert [row[5] for row in tta] == [500, 500, 550]
    runs = json.loads((ROOT / "results" / "time_to_accuracy_cpu.json").read_text())["runs"]["time_to_accuracy"]
    assert round(min(r["seconds"] for r in runs)) == 28 and round(max(r["seconds"] for r in runs)) == 37
    assert sum(r["seconds"] <= 30 for r in runs) == 3