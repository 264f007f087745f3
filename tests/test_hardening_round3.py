"""Hostile and careless inputs, third round (issue 30): each is refused at spec validation, before data is
generated or an MLflow run exists, with the field named; console and MLflow tell the same story."""
from __future__ import annotations

import time

import pytest

from orchestrator.specs import MAX_SWEEP_RUNS, SpecError, load_spec


def sweep_spec(tmp_path, search: dict, **sections):
    return load_spec({"name": "hostile", "storage": {"runs_dir": str(tmp_path / "runs")},
                      "train": {"epochs": 2}, "search": search, **sections})


def check_before_anything(tmp_path, spec, match: str) -> None:
    """`check_search` refuses the spec (what `avtune sweep` and `avtune submit` call first) and nothing exists yet."""
    from orchestrator.sweep import check_search

    with pytest.raises(SpecError, match=match):
        check_search(spec)
    assert not (tmp_path / "runs").exists()


# ---- (9) search.metric is one every swept method reports ----------------------------------------------


@pytest.mark.parametrize("search, sections, match", [
    ({"compare": ["normal", "audio_only"], "scheduler": "asha", "metric": "acc_visual"}, {},
     r"search.metric 'acc_visual' is not reported by method audio_only"),
    ({"compare": ["normal", "visual_only"], "metric": "shapley_audio"}, {},
     r"search.metric 'shapley_audio' is not reported by method visual_only"),
    ({"searcher": "optuna", "space": {"train.learning_rate": {"loguniform": [0.001, 0.1]}}, "metric": "k_audio"}, {},
     r"every trial: search.metric 'k_audio' is not reported by method normal"),
    ({"compare": ["ogm", "normal"], "scheduler": "asha", "metric": "k_visual"}, {"method": {"name": "ogm"}},
     r"search.metric 'k_visual' is not reported by method normal"),
    ({"compare": ["gblend", "normal"], "metric": "gblend_w_joint"}, {"method": {"name": "gblend", "weights": "uniform"}},
     r"search.metric 'gblend_w_joint' is not reported by method normal"),
    ({"seeds": [0, 1], "scheduler": "asha", "metric": "loss_train_eval"}, {},
     r"search.metric 'loss_train_eval' is not reported by method normal"),
    ({"compare": ["avid", "normal"], "scheduler": "asha", "metric": "shapley_visual"}, {},
     r"search.metric 'shapley_visual' is not reported by method avid"),
])
def test_a_search_metric_some_swept_method_never_reports_is_refused(tmp_path, search, sections, match):
    """Tune's strict metric check ended such sweeps (parent FAILED) at the first result without the metric,
    after trials had trained; now the spec is refused naming the method and the metric."""
    check_before_anything(tmp_path, sweep_spec(tmp_path, search, **sections), match)


@pytest.mark.parametrize("search, sections", [
    ({"compare": ["normal", "ogm"], "scheduler": "asha", "metric": "acc_visual"}, {}),
    ({"compare": ["normal", "audio_only", "visual_only"], "scheduler": "asha", "metric": "acc"}, {}),
    ({"seeds": [0, 1], "scheduler": "asha", "metric": "loss_train_eval"}, {"train": {"epochs": 2, "train_split_loss": True}}),
    ({"compare": ["gblend", "normal"], "metric": "acc_audio", "scheduler": "asha"}, {"method": {"name": "gblend"}}),
])
def test_a_search_metric_every_swept_method_reports_is_accepted(tmp_path, search, sections):
    from orchestrator.sweep import check_search

    check_search(sweep_spec(tmp_path, search, **sections))


def test_stages_before_the_main_trials_are_neither_searched_nor_scheduled(tmp_path):
    """G-Blend's estimation heads (audio-only, visual-only) and the AVID stage never report what the main
    search ranks by: their tuners have no searcher (Optuna) and no scheduler to demand it."""
    from orchestrator.sweep import GBLEND_STAGE, make_tuner

    spec = sweep_spec(tmp_path, {"searcher": "optuna", "scheduler": "asha", "metric": "acc_visual",
                                 "space": {"train.learning_rate": {"choice": [0.01, 0.1]}}},
                      method={"name": "gblend"})
    tuner, _ = make_tuner(spec, {}, "stage", "0" * 32, "sqlite:///unused.db", GBLEND_STAGE, scheduler_on=False)
    config = tuner._local_tuner._tune_config  # noqa: SLF001 - what the Tuner was built with (Ray 2.60)
    assert config.search_alg is None and config.scheduler is None
    main, _ = make_tuner(spec, {"train.learning_rate": __import__("ray").tune.choice([0.01, 0.1])}, "main",
                         "0" * 32, "sqlite:///unused.db", "main")
    assert main._local_tuner._tune_config.search_alg is not None  # noqa: SLF001


# ---- (3) the size of a search is counted, capped, and validated without a copy per combination ------------


def test_a_search_of_100000_seeds_is_refused_at_load_naming_the_count(tmp_path):
    started = time.perf_counter()
    with pytest.raises(SpecError, match=rf"search: .*search plans 100,000 runs \(.*100000 seed\(s\).* more than the "
                                        rf"{MAX_SWEEP_RUNS:,} a sweep may run"):
        sweep_spec(tmp_path, {"seeds": list(range(100_000))})
    assert time.perf_counter() - started < 10  # was: 12 minutes and 743 MB, then killed


@pytest.mark.parametrize("search, runs", [
    ({"space": {"train.learning_rate": {"grid": [0.1 / (i + 1) for i in range(101)]},
                "model.width": {"grid": list(range(4, 104))}}}, 10_100),
    ({"compare": ["normal", "ogm"], "space": {"method.alpha": {"grid": [0.1 * i for i in range(1, 101)]}},
      "seeds": list(range(100))}, 100 * 101),
    ({"space": {"model.fusion": {"choice": ["sum", "concat"]}}, "searcher": "random", "num_samples": 5001,
      "seeds": [0, 1]}, 10_002),
])
def test_every_way_a_search_multiplies_out_counts_against_the_cap(tmp_path, search, runs):
    with pytest.raises(SpecError, match=rf"search plans {runs:,} runs"):
        sweep_spec(tmp_path, search)


def test_validating_a_large_search_builds_one_trial_spec_per_configuration_not_per_seed(tmp_path, monkeypatch):
    """9,000 seeds of one configuration: one trial spec validated (the seeds' range is checked by search.seeds),
    none of them a deep copy of a spec holding the 9,000 seeds."""
    import orchestrator.sweep as sweep

    spec = sweep_spec(tmp_path, {"seeds": list(range(9_000)), "group_seeds": False})
    built = []
    real = sweep.validate_spec
    monkeypatch.setattr(sweep, "validate_spec", lambda data, source="": built.append(data) or real(data, source))
    started = time.perf_counter()
    sweep.check_search(spec)
    assert len(built) == 1 and built[0]["search"] is None
    assert time.perf_counter() - started < 5  # was: about 10 s (0.6 s for 2,000 seeds, quadratic)
