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
    runs = lambda mix, variant: sorted((m for m in metrics if m["train_mix"] == mix and m["variant"] == variant),
                                       key=lambda m: m["seed"])
    mean = lambda mix, variant, key: sum(key(m) for m in runs(mix, variant)) / 3
    accuracy = lambda kind, n: (lambda m: m["accuracy"][kind][str(n)])
    seeds = lambda mix, variant, kind, n: [accuracy(kind, n)(m) for m in runs(mix, variant)]
    mixed, baselines = "irrelevant images", ("standard", "gated")
    assert [round(mean("text only", a, accuracy("blank", 16)), 2) for a in ("gated", "sigma", "standard")] == [0.10, 0.15, 0.16]
    assert all(accuracy("noise", 64)(m) == 0 for a in ("standard", "gated", "sigma") for m in runs("text only", a))
    assert [round(mean("text only", a, accuracy("blank", 64)), 2) for a in ("sigma", "standard", "gated")] == [0.11, 0.01, 0.04]
    assert round(min(mean(mixed, a, accuracy(kind, n)) for a in ("standard", "gated", "sigma") for kind in ("blank", "noise")
                     for n in (8, 16)), 3) == 0.998
    assert [round(mean(mixed, a, accuracy("blank", 64)), 2) for a in ("sigma", "standard", "gated")] == [0.92, 0.41, 0.68]
    assert [round(mean(mixed, a, accuracy("noise", 128)), 2) for a in ("sigma", "standard", "gated")] == [0.97, 0.71, 0.82]
    assert [round(mean(mixed, a, accuracy("noise", 64)), 2) for a in ("sigma", "standard", "gated")] == [0.99, 0.90, 0.96]
    for kind, n in (("blank", 64), ("noise", 128)):                   # ahead of both baselines on 3 of 3 seeds
        assert all(s > max(o) for s, *o in zip(seeds(mixed, "sigma", kind, n), *(seeds(mixed, a, kind, n) for a in baselines)))
    caption = lambda m: m["caption_exact_match"]
    assert [round(mean(mixed, a, caption), 3) for a in ("sigma", "standard", "gated")] == [0.968, 0.973, 0.957]
    assert [round(mean(mixed, v, accuracy("blank", 64)), 2) for v in ("0 intra heads", "1 intra head", "sigma", "3 intra heads")] \
        == [0.63, 0.81, 0.92, 0.92]
    assert [round(mean(mixed, v, accuracy("noise", 128)), 2) for v in ("3 intra heads", "sigma", "1 intra head")] == [0.72, 0.97, 0.98]
    assert [round(mean(mixed, v, accuracy("blank", 64)), 2) for v in ("gates off", "stream bias off", "bias init 0")] == [0.85, 0.94, 0.80]
    sigma_seeds = seeds(mixed, "sigma", "blank", 64)
    assert round(min(sigma_seeds), 2) == 0.87 and max(sigma_seeds) == 1.0
    for v in ("gates off", "stream bias off", "bias init 0"):         # each variant's seeds overlap SIGMA's
        assert max(seeds(mixed, v, "blank", 64)) >= min(sigma_seeds) and min(seeds(mixed, v, "blank", 64)) <= max(sigma_seeds)
    others = [v for v in dilution.ABLATIONS if v not in ("sigma", "1 intra head")]
    assert [round(x, 2) for x in sorted(mean(mixed, v, accuracy("noise", 128)) for v in others)][::len(others) - 1] == [0.64, 0.91]


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
    assert [round(log[i][1]) for i in (0, -2, -1)] == [221, 35, 31]
    assert [row[5] for row in log] == [1950, 750, 800, 650, 700, 650, 550, 550, 450]
    assert log[2][4] == "1/3" and all(row[4] == "3/3" for row in log[3:])
    assert [round(row[6], 3) for row in log[6:8]] == [0.945, 0.969]
    runs = json.loads((ROOT / "results" / "speedrun_log_cpu.json").read_text())["runs"]["speedrun_log"]
    last = [1e3 * r["seconds"] / r["step"] for r in runs if r["rung"] == len(log) - 1]
    assert round(min(last)) == 62 and round(max(last)) == 72
    threads, tta = (t["rows"] for t in json.loads((ROOT / "results" / "time_to_accuracy_cpu.json").read_text())["tables"])
    assert [round(row[3], 2) for row in threads] == [1.0, 0.71, 0.88, 2.66]
    assert [round(row[1]) for row in tta] == [29, 33, 34] and all(row[4] == "3/3" for row in tta)
    assert [row[5] for row in tta] == [400, 450, 450]
    runs = json.loads((ROOT / "results" / "time_to_accuracy_cpu.json").read_text())["runs"]["time_to_accuracy"]
    assert round(min(r["seconds"] for r in runs)) == 28 and round(max(r["seconds"] for r in runs)) == 42
    assert sum(r["seconds"] <= 30 for r in runs) == 2 and sorted({r["step"] for r in runs}) == [400, 450, 550]
    per_step = [1e3 * r["seconds"] / r["step"] for r in runs]
    assert round(min(per_step)) == 67 and round(max(per_step)) == 77
    compare = json.loads((ROOT / "results" / "cpu" / "results.json").read_text())["runs"]
    first_95 = [next(t for _, t, em in r["exact_match_curve"] if em >= 0.95) for rs in compare.values() for r in rs]
    assert (round(min(first_95), 1), round(max(first_95), 1)) == (24.5, 38.4)
    compare_step = [1e3 * r["train_seconds"] / r["steps"] for rs in compare.values() for r in rs]
    assert round(min(compare_step)) == 60 and round(max(compare_step)) == 72