"""stats.py: the sign-flip test against an independent count, Holm against its definition, the bootstrap
against the normal approximation it should approach, and bad input."""

import random
import statistics

import pytest
from hypothesis import given, settings, strategies as st

from sigma_ref.lab import stats


def sign_flip_p_by_subset_sums(differences: list[int]) -> float:
    """The same test counted another way (integers only): flipping the subset F changes the sum to
    total - 2 * sum(F), so count the subsets by their sum (dynamic programming) instead of listing flips."""
    total = sum(differences)
    counts = {0: 1}
    for d in differences:
        new = dict(counts)
        for s, c in counts.items():
            new[s + d] = new.get(s + d, 0) + c
        counts = new
    extreme = sum(c for s, c in counts.items() if abs(total - 2 * s) >= abs(total))
    return extreme / 2 ** len(differences)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=12))
def test_sign_flip_p_matches_a_count_by_subset_sums(differences):
    assert stats.paired_sign_flip_p(differences) == pytest.approx(sign_flip_p_by_subset_sums(differences))


@pytest.mark.parametrize("differences, p", [([0.2, 0.1, 0.3], 0.25), ([0.1, -0.1, 0.0], 1.0),
                                            ([0.1, 0.1, 0.1, 0.1], 0.125), ([0.5, -0.1, 0.2], 0.5)])
def test_paired_sign_flip_p_values(differences, p):
    assert stats.paired_sign_flip_p(differences) == pytest.approx(p)


def test_sign_flip_p_floor_is_two_over_two_to_the_n_and_random_flips_approach_the_exact_p():
    assert stats.paired_sign_flip_p([0.1, 0.2, 0.05]) == 0.25
    assert stats.paired_sign_flip_p([0.01] * 10) == pytest.approx(2 / 2 ** 10)
    assert stats.paired_sign_flip_p([0.0, 0.0]) == 1.0
    differences = [3, -1, 2, 4, 1, -2, 3, 1, 2, 0, 1, 2, -1, 3, 2, 1, 1, -3]          # 18 > EXACT_FLIPS_UP_TO
    assert stats.paired_sign_flip_p(differences) == pytest.approx(sign_flip_p_by_subset_sums(differences), abs=0.005)


def test_holm_on_a_worked_example_and_never_below_p_nor_above_bonferroni():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = random.Random(1)
    for _ in range(50):
        p = [rng.random() ** 3 for _ in range(rng.randint(1, 9))]
        adjusted = stats.holm(p)
        assert all(a >= q - 1e-15 and a <= min(1.0, len(p) * q) + 1e-12 for a, q in zip(adjusted, p))
        order = sorted(range(len(p)), key=p.__getitem__)
        assert [adjusted[i] for i in order] == sorted(adjusted)        # the order of the p-values is kept
    assert stats.holm([]) == []


def test_with_holm_marks_only_what_survives_the_correction():
    compared = stats.with_holm([{"p": 0.002}, {"p": 0.03}, {"p": 0.2}])
    assert [c["p_holm"] for c in compared] == pytest.approx([0.006, 0.06, 0.2])
    assert [c["significant"] for c in compared] == [True, False, False]


def bootstrap_by_loop(values, level=0.95, resamples=1000, seed=0):
    """The definition, one draw at a time: random.Random(seed).choices, each mean summed left to right."""
    rng, n = random.Random(seed), len(values)
    means = []
    for _ in range(resamples):
        total = 0.0
        for value in rng.choices(values, k=n):
            total += value
        means.append(total / n)
    means.sort()
    return means[int((1 - level) / 2 * (resamples - 1))], means[int(round((1 + level) / 2 * (resamples - 1)))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=20), st.integers(0, 50),
       st.sampled_from([0.8, 0.9, 0.95]))
def test_the_vectorised_bootstrap_is_the_loop_to_the_bit(values, seed, level):
    assert stats.bootstrap_interval(values, level, 1000, seed) == bootstrap_by_loop(values, level, 1000, seed)


def test_bootstrap_interval_brackets_the_mean_and_approaches_the_normal_width():
    rng = random.Random(0)
    values = [rng.gauss(0.5, 0.1) for _ in range(400)]
    low, high = stats.bootstrap_interval(values)
    mean = statistics.fmean(values)
    assert low < mean < high
    normal_width = 2 * 1.96 * statistics.stdev(values) / len(values) ** 0.5
    assert high - low == pytest.approx(normal_width, rel=0.15)
    few = [0.91, 0.95, 0.97, 0.99]
    low, high = stats.bootstrap_interval(few)
    assert min(few) <= low < statistics.fmean(few) < high <= max(few)
    assert stats.bootstrap_interval([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert stats.bootstrap_interval(few) == stats.bootstrap_interval(few)          # seeded: reproducible


def test_summary_uses_the_sample_std_and_paired_comparison_pairs_by_position():
    s = stats.summarize([1.0, 2.0, 3.0])
    assert (s["n"], s["mean"], s["std"]) == (3, 2.0, 1.0)
    assert stats.summary_text([1.0, 2.0, 3.0]).startswith("2.000 ± 1.000 [")
    c = stats.paired_comparison([0.9, 0.8, 0.7], [0.8, 0.8, 0.9])
    assert c["mean_difference"] == pytest.approx(-0.1 / 3)
    assert (c["a_higher"], c["b_higher"], c["n"]) == (1, 1, 3)
    assert c["ci95"][0] <= c["mean_difference"] <= c["ci95"][1]


@pytest.mark.parametrize("call, names", [
    (lambda: stats.summarize([]), "values"),
    (lambda: stats.summarize([0.1, "x"]), "values"),
    (lambda: stats.paired_sign_flip_p([]), "differences"),
    (lambda: stats.holm([0.5, 1.5]), "p_values"),
    (lambda: stats.paired_comparison([0.1, 0.2], [0.3]), "a and b"),
    (lambda: stats.bootstrap_interval([0.1, 0.2], level=1.0), "level"),
    (lambda: stats.bootstrap_interval([0.1, 0.2], resamples=0), "resamples"),
])
def test_bad_input_names_the_argument(call, names):
    with pytest.raises(ValueError, match=names):
        call()
