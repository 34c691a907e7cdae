"""The lab: the tooling that trains, measures and compares, built on the core a learner reads.

    runs           one model trained and evaluated into its directory; jobs in spawned worker processes
    experiments    ensure_trained (reuses and resumes runs, trains in parallel workers), compare, summary tables
    dilution       the dilution experiment: two training mixes, 0-128 irrelevant image tokens, SIGMA's and MODA's
                   ablations
    var_study      `var`: do the trained models have visual sinks, and what VAR applied to them changes
    bench          attention, memory and training-step benchmarks (ratios from interleaved rounds)
    lower_bounds   what SIGMA would cost with an overhead taken away, timed beside it by bench
    speedrun       time to accuracy, the recipe's speedrun log, training threads
    gpucheck       `gpu-check`: every backend against math in bf16, the GPU benchmark, the gpu preset
    stats          reading a seed spread: summaries with bootstrap intervals, paired tests, Holm's correction
    report         the generated blocks of README.md and docs/ (`report`)

Nothing in the core imports the lab; the lab imports the core, and the CLI (__main__) imports both.
"""
