"""Reading a seed spread: summaries with bootstrap intervals, paired tests, and Holm's correction.

    summarize([0.97, 0.99, 0.96])              {"n", "mean", "std", "ci95"}: the numbers every results table prints
    paired_sign_flip_p(differences)            exact p of a paired sign-flip test (seed by seed differences)
    holm([p1, p2, p3])                         the p-values adjusted for making several comparisons at once
    paired_comparison(a, b)                    a - b seed by seed: mean, interval, wins, p

Why these. Every model here is trained with a seed, and seeds of one recipe differ by several points on a
small test set. A difference between two attentions is read on the SAME seeds (same data order, same
initialisation seed), so the test is paired: the sign-flip test asks how often flipping the sign of each
seed's difference gives a mean at least as far from 0 as the one observed; if the attentions were
interchangeable every flip would be as likely. It assumes nothing about the shape of the spread, and it is
exact: with n seeds there are 2^n flips, and the smallest p it can give is 2 / 2^n (0.25 with 3 seeds,
0.002 with 10). A table that tests k differences at once will show some small p by luck; Holm's step-down
correction keeps the chance of any false "X beats Y" in the table at the level chosen (5%), and is never
weaker than testing each at 5% / k.

The 95% interval is a percentile bootstrap of the mean: resample the seeds with replacement, take each
resample's mean, and keep the middle 95%. With ten seeds it is rough (it cannot reach past the observed
extremes), and it says how far the mean could move with other seeds, not where one more seed would fall.
The standard deviation is the sample one (n - 1), everywhere in the course.
"""

from __future__ import annotations

import itertools
import random
import statistics

import numpy as np

from ..checks import check_int

BOOTSTRAP_RESAMPLES = 10_000
EXACT_FLIPS_UP_TO = 16           # seeds; above it the sign-flip test draws FLIP_DRAWS random flips instead
FLIP_DRAWS = 100_000


def _check_values(name: str, values, least: int = 1) -> list[float]:
    values = list(values)
    if len(values) < least or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a list of at least {least} numbers, got {values!r}")
    return [float(v) for v in values]


def sample_std(values) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0 for a single value."""
    values = _check_values("values", values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def bootstrap_interval(values, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: `resamples` means of the values drawn with replacement, and
    the (1 - level) / 2 and (1 + level) / 2 quantiles of them. Seeded, so a results file is reproducible.

    The draws are those of random.Random(seed).choices(values, k=n), resample after resample, and each mean is
    the left-to-right sum over n: numpy's RandomState runs the same Mersenne Twister from the same state and
    builds its doubles the same way (53 bits from two words), floor(u * n) picks the same index, and a cumulative
    sum adds in the same order. So the interval equals the plain loop's to the bit, in a few milliseconds
    instead of tens (the tables compute dozens; tests/test_stats.py holds the two equal).
    """
    values = _check_values("values", values)
    check_int("resamples", resamples, low=1)
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")
    if len(values) == 1:
        return values[0], values[0]
    n = len(values)
    _, words, _ = random.Random(seed).getstate()                  # 624 state words, then the position
    generator = np.random.RandomState()
    generator.set_state(("MT19937", np.array(words[:-1], dtype=np.uint32), words[-1]))
    picks = np.floor(generator.random_sample((resamples, n)) * n).astype(np.int64)      # [resamples, n]
    means = np.sort(np.asarray(values)[picks].cumsum(axis=1)[:, -1] / n)
    low = means[int((1 - level) / 2 * (resamples - 1))]
    high = means[int(round((1 + level) / 2 * (resamples - 1)))]
    return float(low), float(high)


def summarize(values) -> dict:
    """{"n", "mean", "std" (sample), "ci95" (bootstrap interval of the mean)} of per-seed values."""
    values = _check_values("values", values)
    return {"n": len(values), "mean": statistics.fmean(values), "std": sample_std(values),
            "ci95": list(bootstrap_interval(values))}


def summary_text(values, digits: int = 3) -> str:
    """"mean ± std [low, high]": the mean, the sample standard deviation and the 95% bootstrap interval."""
    s = summarize(values)
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
            f"[{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]")


def paired_sign_flip_p(differences) -> float:
    """Two-sided p of the paired sign-flip test: the share of sign flips of the differences whose mean is at least
    as far from 0 as the observed mean. Exact (all 2^n flips) up to EXACT_FLIPS_UP_TO differences, else
    FLIP_DRAWS random flips (seeded). All differences 0 give p = 1."""
    differences = _check_values("differences", differences)
    n = len(differences)
    observed = abs(sum(differences)) / n - 1e-12                     # ties count as "at least as far"
    if n <= EXACT_FLIPS_UP_TO:
        flips = itertools.product((1, -1), repeat=n)
        total = 2 ** n
    else:
        rng = random.Random(0)
        flips = ([rng.choice((1, -1)) for _ in range(n)] for _ in range(FLIP_DRAWS))
        total = FLIP_DRAWS
    extreme = sum(abs(sum(s * d for s, d in zip(signs, differences))) / n >= observed for signs in flips)
    return extreme / total


def holm(p_values) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given: sort ascending, multiply the i-th smallest (from 0)
    by (k - i), carry the running maximum so the order is kept, cap at 1. A comparison is significant at level
    alpha after the correction when its adjusted p <= alpha."""
    p_values = _check_values("p_values", p_values, least=0)
    if any(not 0 <= p <= 1 for p in p_values):
        raise ValueError(f"p_values must lie in [0, 1], got {p_values!r}")
    k = len(p_values)
    adjusted = [0.0] * k
    running = 0.0
    for rank, index in enumerate(sorted(range(k), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (k - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def paired_comparison(a, b) -> dict:
    """a - b seed by seed (a[i] and b[i] share a seed): the mean difference, its 95% bootstrap interval, how many
    seeds favour a, and the sign-flip p (uncorrected; holm() corrects a family of them)."""
    a, b = _check_values("a", a), _check_values("b", b)
    if len(a) != len(b):
        raise ValueError(f"a and b must hold one value per seed each, got {len(a)} and {len(b)} values")
    differences = [x - y for x, y in zip(a, b)]
    return {"n": len(differences), "mean_difference": statistics.fmean(differences),
            "ci95": list(bootstrap_interval(differences)), "a_higher": sum(d > 0 for d in differences),
            "b_higher": sum(d < 0 for d in differences), "p": paired_sign_flip_p(differences)}


def with_holm(comparisons: list[dict], alpha: float = 0.05) -> list[dict]:
    """The comparisons (dicts with "p") with "p_holm" and "significant" (p_holm <= alpha) added, corrected as one
    family: every comparison a table makes at once."""
    adjusted = holm([c["p"] for c in comparisons])
    return [{**c, "p_holm": p, "significant": p <= alpha} for c, p in zip(comparisons, adjusted)]
