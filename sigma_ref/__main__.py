"""Command line: python -m sigma_ref {train,compare,figures,bench,dilution,var,gpu-check,data,demo,release,publish,book,
report}
(each has --help)."""

from __future__ import annotations

import argparse
import json
import sys

from . import data, kernels, masks, train
from .model import ATTENTIONS
from .lab import bench, dilution, experiments, gpucheck, report, runs, speedrun, var_study
from .teaching import course
from .runtime import TRAINING_THREADS, machine_description, torch_threads

KINDS = tuple(ATTENTIONS)          # the attention kinds: model.ATTENTIONS is the one list
PRESETS = tuple(train.PRESETS)


def _bench(args) -> None:
    if args.time_to_accuracy or args.speedrun_log or args.threads or args.stopping_rules:
        _speedrun(args)
        return
    results = bench.run(sizes=args.sizes, repeats=args.repeats, memory=not args.no_memory,
                        crossover=args.crossover, train_step=args.train_step)
    if args.out:
        bench.save(results, args.out)
        print(f"wrote {args.out}")


def _speedrun(args) -> None:
    """The learning-speed benchmarks: each prints its table; --out also writes tables and raw runs as JSON."""
    print(f"machine: {machine_description()}\n", flush=True)
    tables, runs = [], {}
    if args.threads:
        tables.append(speedrun.thread_table())
        print(tables[-1].markdown() + "\n", flush=True)
    if args.time_to_accuracy:
        table, runs["time_to_accuracy"] = speedrun.time_to_accuracy_table(seeds=args.seeds, first_seed=args.first_seed)
        tables.append(table)
        print(table.markdown() + "\n", flush=True)
    if args.stopping_rules:
        runs["check_curves"] = speedrun.check_curves(range(args.first_seed, args.first_seed + args.seeds))
        tables.append(speedrun.stopping_rule_table(runs["check_curves"]))
        print(tables[-1].markdown() + "\n", flush=True)
    if args.speedrun_log:
        table, runs["speedrun_log"] = speedrun.speedrun_log_table(seeds=args.seeds)
        tables.append(table)
        print(table.markdown() + "\n", flush=True)
    if args.out:
        bench.save({"machine": machine_description(), "runs": runs,
                    "tables": [t.as_dict() for t in tables]}, args.out)
        print(f"wrote {args.out}")


def _attention_options(args) -> dict:
    """The attention's options from the command line, as ModelConfig.updated takes them (only those given)."""
    overrides = {}
    if args.intra_heads is not None:
        values = [int(v) for v in args.intra_heads.split(",")]
        overrides["num_intra_heads"] = values[0] if len(values) == 1 else tuple(values)
    if args.bias_init is not None:
        values = [float(v) for v in args.bias_init.split(",")]
        if len(values) != 4:
            raise SystemExit(f"--bias-init needs 4 numbers (intra text, intra image, global text, global image), "
                             f"got {args.bias_init!r}")
        overrides["bias_init"] = (tuple(values[:2]), tuple(values[2:]))
    if args.no_gates:
        overrides["use_gates"] = False
    if args.no_stream_bias:
        overrides["use_stream_bias"] = False
    if args.headwise_gate:
        overrides["headwise_gate"] = True
    return overrides


def _train(args) -> None:
    config = train.get_preset(args.preset).updated(backend=args.backend, max_irrelevant_images=args.max_train_images)
    with torch_threads(TRAINING_THREADS):               # the thread policy (runtime.py), as compare trains
        metrics = runs.train_and_evaluate(args.attention, args.preset, args.seed, args.out, resume=args.resume,
                                                 config=config, model_overrides=_attention_options(args))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("loss_curve", "gate_history")}, indent=2))


def _compare(args) -> None:
    experiments.compare(args.preset, args.seeds, args.out, attentions=args.attentions, backend=args.backend)


def _dilution(args) -> None:
    dilution.run_dilution(args.seeds, args.out, ablations=args.ablations, workers=args.workers,
                          attentions=args.attentions)


def _var(args) -> None:
    try:
        var_study.run_var_study(args.runs, args.seeds, args.out, None if args.dilution == "none" else args.dilution,
                                workers=args.workers)
    except ValueError as error:
        print(f"var: {error}", file=sys.stderr)
        sys.exit(1)


def _gpu_check(args) -> None:
    try:
        gpucheck.run_gpu_check(args.out)
    except ValueError as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        sys.exit(1)


def _figures(args) -> None:
    for path in experiments.write_compare_figures(experiments.load_results(args.dir), args.dir):
        print(f"wrote {path}")


def _data(args) -> None:
    directory = args.dir or data.DATA_DIR
    if args.regenerate:
        data.write_splits(directory)
        print(f"regenerated the evaluation splits in {directory}")
    problems = data.check_splits(directory)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    print(f"{directory}: every split matches the data card")


def _demo(args) -> None:
    {"masks": masks._demo, "kernels": kernels._demo}[args.what]()


def _release(args) -> None:
    written = course.release(args.out, args.notebooks)
    print(f"{args.out} is an nbgrader course directory: the instructor's notebooks in {args.out}/source/"
          f"{course.ASSIGNMENT}/, {len(written)} learner copies (exercise stubs, no solutions, no outputs) in "
          f"{written[0].parent}/; grade collected submissions with `nbgrader autograde {course.ASSIGNMENT}` there")


def _publish(args) -> None:
    written = course.publish(args.repository, args.root)
    print(f"published at {args.repository}: wrote {len(written)} files (pyproject.toml, every "
          f"notebook's install cell, README.md's launch badges); `python -m sigma_ref book` adds launch buttons")


def _book(args) -> None:
    index = course.build_book(args.out, args.notebooks)
    print(f"the course, executed: {index}")


def _report(args) -> None:
    if args.check:
        stale = report.stale_blocks()
        for block in stale:
            print(f"stale: {block}")
        sys.exit(1 if stale else 0)
    changed = report.write()
    print(f"rewrote the generated blocks of {', '.join(changed)}" if changed else "every generated block is current")


def build_parser() -> argparse.ArgumentParser:
    """Every command, its options, and the function that runs it (`args.run`)."""
    parser = argparse.ArgumentParser(prog="python -m sigma_ref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("bench", help="attention and training-step benchmarks (tables of medians and ratios)")
    p.add_argument("--out", help="also write the tables as JSON to this file")
    p.add_argument("--sizes", type=int, nargs="*", default=[512, 2048, 4096, 8192],
                   help="sequence lengths of the timing and memory tables (none: skip them)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per median")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    p.add_argument("--crossover", action="store_true", help="add the packed-vs-sdpa crossover table")
    p.add_argument("--train-step", action="store_true", help="add the tiny-model training-step table")
    p.add_argument("--time-to-accuracy", action="store_true",
                   help="instead: time to 95%% caption exact match for each attention (preset cpu)")
    p.add_argument("--speedrun-log", action="store_true",
                   help="instead: the speedrun log, each recipe change timed to 95%% against the one before")
    p.add_argument("--threads", action="store_true",
                   help="instead: a training step with 1 and 2 threads, the other core idle and busy")
    p.add_argument("--stopping-rules", action="store_true",
                   help="instead: the stopping-rule study, whole runs checked every 25 steps and rules replayed")
    p.add_argument("--seeds", type=int, default=3,
                   help="how many seeds --time-to-accuracy, --stopping-rules and --speedrun-log train")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first seed of --time-to-accuracy and --stopping-rules (default 0): --seeds 10 "
                        "--first-seed 10 trains seeds 10-19")
    p.set_defaults(run=_bench)

    p = commands.add_parser("train", help="train one tiny MLLM and write DIR/metrics.json")
    p.add_argument("--attention", choices=KINDS, required=True)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--backend", choices=kernels.BACKENDS, default="auto", help="attention kernel (default: auto)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt if present")
    p.add_argument("--max-train-images", type=int, default=0,
                   help="training mix: text-only samples carry 0..K irrelevant image tokens (default 0: none)")
    parts = p.add_argument_group("SIGMA's parts (ablations)")
    parts.add_argument("--intra-heads", help="intra heads of H: one number, or one per layer (e.g. 2,0)")
    parts.add_argument("--bias-init", help="stream bias init: intra text, intra image, global text, global image")
    parts.add_argument("--no-gates", action="store_true", help="no gates (the streams are simply added)")
    parts.add_argument("--no-stream-bias", action="store_true", help="gates without the modality-specific bias")
    p.add_argument("--headwise-gate", action="store_true", help="Gated Attention: one gate value per head")
    p.set_defaults(run=_train)

    p = commands.add_parser("compare", help="train every attention for several seeds; table and figures")
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--attentions", nargs="+", choices=KINDS, default=KINDS)
    p.add_argument("--backend", choices=kernels.BACKENDS, default="auto", help="attention kernel (default: auto)")
    p.set_defaults(run=_compare)

    p = commands.add_parser("dilution", help="does SIGMA stop the dilution? each attention x 2 training mixes x seeds, "
                                                "text-only accuracy with 0..8k irrelevant image tokens")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    p.add_argument("--out", default="results/dilution", help="output directory (default: results/dilution)")
    p.add_argument("--ablations", action="store_true", help="also train SIGMA's ablation grid (its config switches)")
    p.add_argument("--workers", type=int, default=None, help="parallel training processes (default: one per core)")
    p.add_argument("--attentions", nargs="+", choices=KINDS, default=KINDS, help="which attentions (default: all)")
    p.set_defaults(run=_dilution)

    p = commands.add_parser("var", help="VAR on trained models: sink dimensions, the paper's tests, and VAR applied "
                                         "over p x rho (writes OUT/results.json, .md and phi_distributions.png)")
    p.add_argument("--runs", default="results/cpu", help="a compare run's directory (default: results/cpu)")
    p.add_argument("--dilution", default="results/dilution",
                   help="a dilution run's directory, or 'none' (default: results/dilution)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 of each attention")
    p.add_argument("--out", default="results/var", help="output directory (default: results/var)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per core)")
    p.set_defaults(run=_var)

    p = commands.add_parser("gpu-check", help="on CUDA: backends vs math in bf16, the benchmark to N=16384, the "
                                                 "gpu preset; writes OUT/gpu_check.json and .md (exits 1 without CUDA)")
    p.add_argument("--out", default="results/gpu", help="output directory (default: results/gpu)")
    p.set_defaults(run=_gpu_check)

    p = commands.add_parser("figures", help="(re)draw the figures of a finished compare run from its results.json")
    p.add_argument("dir", help="the compare output directory")
    p.set_defaults(run=_figures)

    p = commands.add_parser("data", help="check (or regenerate) the shipped evaluation splits")
    p.add_argument("--check", action="store_true", help="verify every file against the data card (default)")
    p.add_argument("--regenerate", action="store_true", help="rewrite the splits and the data card")
    p.add_argument("--dir", default=None, help="data directory (default: the shipped data/, or the installed copy)")
    p.set_defaults(run=_data)

    p = commands.add_parser("demo", help="print a module's own small demo")
    p.add_argument("what", choices=["masks", "kernels"])
    p.set_defaults(run=_demo)

    p = commands.add_parser("release", help="an nbgrader course directory: the instructor's notebooks and the "
                                            "learner copies (exercise stubs, solutions removed)")
    p.add_argument("--out", required=True, help="the course directory (nbgrader_config.py, source/, release/)")
    p.add_argument("--notebooks", default=None, help="the course's notebooks (default: notebooks/ of this checkout)")
    p.set_defaults(run=_release)

    p = commands.add_parser("publish", help="write the course's public GitHub URL where it links to itself: "
                                            "the notebooks' install cells, README's Colab/Binder badges, the book")
    p.add_argument("--repository", required=True, help="https://github.com/OWNER/REPO")
    p.add_argument("--root", default=None, help="the course checkout to write into (default: the one this package "
                                                "is installed from)")
    p.set_defaults(run=_publish)

    p = commands.add_parser("book", help="execute the notebooks (solved) and build the course as a static site")
    p.add_argument("--out", default="build/book", help="output directory (default: build/book, ignored by git)")
    p.add_argument("--notebooks", default=None, help="the course's notebooks (default: notebooks/ of this checkout)")
    p.set_defaults(run=_book)

    p = commands.add_parser("report", help="rewrite README.md's and docs/'s generated blocks from results/")
    p.add_argument("--check", action="store_true", help="only check: exit 1 if a block differs from results/")
    p.set_defaults(run=_report)

    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
