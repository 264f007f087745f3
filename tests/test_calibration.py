"""The report's statistics checked by simulation (issue 26): on sweeps where no configuration differs
from normal, its verdicts keep their stated error rates, and a real difference of the size the report
says it can detect is found about as often as it says. Everything goes through the report's own code
path (`comparisons.report_tests` on a sweep's table and per-clip predictions), in-process, no Ray.

The simulated sweeps (tests/simulated_sweeps.py): 13 configurations (normal and 12 others), 3 or 5 seeds,
96 or 1,000 validation clips, trained models whose accuracy varies from seed to seed with sd 0, 0.04 or
0.08. Fixed random seeds: the figures below are reproducible; each bound leaves room for the simulation's
own noise (a rate of 0.05 over 25 sweeps x 36 comparisons has a standard error of about 0.01)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from orchestrator.report.comparisons import power, report_tests
from simulated_sweeps import simulated_sweep

CONFIGS = 13
GRID = [(seeds, clips, sd) for seeds in (3, 5) for clips in (96, 1000) for sd in (0.0, 0.04, 0.08)]


def null_rates(seeds: int, clips: int, seed_sd: float, sweeps: int, rng: np.random.Generator) -> tuple[float, int]:
    """(share of comparisons with normal whose own p-value is at most 0.05, number of sweeps with at
    least one "higher"/"lower" verdict) over `sweeps` null sweeps."""
    raw, comparisons, with_false = 0, 0, 0
    for _ in range(sweeps):
        table, predictions = simulated_sweep(rng, CONFIGS, seeds, clips, seed_sd)
        tests = report_tests(table, predictions)
        versus = tests[tests["family"] == "vs_normal"]
        assert len(versus) == (CONFIGS - 1) * 3
        raw += int((versus["p_value"] <= 0.05).sum())
        comparisons += len(versus)
        with_false += bool(versus["verdict"].isin(["higher", "lower"]).any())
    return raw / comparisons, with_false


@pytest.mark.timeout(120)
def test_null_sweeps_keep_each_test_at_5_percent_and_each_sweep_at_10():
    rng = np.random.default_rng(26)
    sweeps_per_cell, any_false = 20, 0
    for seeds, clips, sd in GRID:
        rate, with_false = null_rates(seeds, clips, sd, sweeps_per_cell, rng)
        assert rate <= 0.07, f"{seeds} seeds, {clips} clips, seed sd {sd}: {rate:.3f} of null comparisons at p <= 0.05"
        assert with_false <= 0.2 * sweeps_per_cell, (seeds, clips, sd, with_false)
        any_false += with_false
    # Holm over the 36 comparisons of each sweep: the share of sweeps with any false verdict.
    assert any_false / (sweeps_per_cell * len(GRID)) <= 0.10


def stated_detectable(seeds: int, clips: int, seed_sd: float, rng: np.random.Generator, sweeps: int = 10) -> float:
    """The difference in the visual head's accuracy the report says it detects with 80% power, from its
    own estimate of the noise (`comparisons.power`) pooled over `sweeps` null sweeps: what a report
    states on average, rather than one sweep's noisy estimate."""
    tests = [report_tests(*simulated_sweep(rng, CONFIGS, seeds, clips, seed_sd)) for _ in range(sweeps)]
    return power(pd.concat(tests, ignore_index=True), "")["heads"]["acc_visual"]["detectable"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seeds,clips,seed_sd", [(5, 96, 0.0), (5, 1000, 0.04)])
def test_a_real_effect_of_the_stated_detectable_size_is_found_80_percent_of_the_time(seeds, clips, seed_sd):
    rng = np.random.default_rng(260 + seeds + clips)
    effect = stated_detectable(seeds, clips, seed_sd, rng)
    assert 0.05 < effect < 0.4, effect
    found, sweeps = 0, 60
    for _ in range(sweeps):
        # One OGM-GE configuration truly raises the visual head by `effect`; nothing else differs.
        tests = report_tests(*simulated_sweep(rng, CONFIGS, seeds, clips, seed_sd, effects={(1, "acc_visual"): effect}))
        row = tests[(tests["family"] == "vs_normal") & (tests["config"] == "ogm_ge alpha=1")
                    & (tests["metric"] == "acc_visual")].iloc[0]
        found += row["verdict"] == "higher"
    assert 0.7 <= found / sweeps <= 0.9, f"{found} of {sweeps} sweeps found a real +{effect:.3f}"


@pytest.mark.timeout(60)
def test_fieller_interval_of_headroom_recovered_covers_the_true_share_95_percent_of_the_time():
    """2,000 simulated 5-seed experiments with a known share of the headroom recovered (0.4): each trained model
    shares its seed's luck (u_s, sd 0.03) and adds its own noise (sd 0.02); normal 0.80, the configuration
    0.84, the uni-modal ensemble 0.90, so x_s = acc_s - normal_s and y_s = ensemble_s - normal_s are correlated
    through normal_s. Fieller's interval (stats.headroom_recovered) must cover 0.04 / 0.10 in 93-97% of them
    (binomial sd of the coverage over 2,000: 0.005)."""
    from orchestrator.report.stats import headroom_recovered

    rng = np.random.default_rng(27)
    experiments, seeds, covered, bounded = 2000, 5, 0, 0
    luck = rng.normal(0.0, 0.03, size=(experiments, seeds))
    normal, acc, ensemble = (mean + luck + rng.normal(0.0, 0.02, size=(experiments, seeds))
                             for mean in (0.80, 0.84, 0.90))
    for k in range(experiments):
        ratio = headroom_recovered(acc[k], normal[k], ensemble[k])
        bounded += ratio.status == "bounded"
        # An unbounded set (headroom not distinguishable from 0) counts as not covering: conservative, and
        # with a true headroom of 8 standard errors it does not occur (checked below).
        covered += ratio.status == "bounded" and ratio.low <= 0.4 <= ratio.high
    assert bounded >= 0.99 * experiments
    assert 0.93 <= covered / experiments <= 0.97, covered / experiments
