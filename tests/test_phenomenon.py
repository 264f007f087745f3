"""The modality-imbalance phenomenon of Peng et al. (OGM-GE, CVPR 2022, Sec. 1 and Fig. 1), reproduced
(generated mp4 clips -> the training engine -> MLflow, logged as a sweep's parent and children) on clips
whose audio is the dominant modality. The trials run in-process through `workers.engine.fit`, the
function every Ray Train worker runs, and are logged with avtune's own run and epoch loggers: this is a
property of the models and methods, and the Ray Train / Tune wiring has its own tests (test_training.py,
test_sweep.py).

Claims checked, each by the report's own verdict (`comparisons.report_tests`: a seed x clip paired t on
the same 6 seeds and the same 128 validation clips, Holm-adjusted within its family) and in the report's
words:
1. audio dominates: the normal model's audio head is above its visual head;
2. the normal joint model under-uses the weak (visual) modality: its visual head ends below a network
   trained on video alone on the same clips;
3. OGM-GE (damping the dominant modality's encoder gradients, Eq. 10 + Sec. 3.3) raises the visual head's
   accuracy above the normal joint model's.

Settings (found empirically with the train loop's own building blocks, several generated sets): 16
classes make the visual signatures (hue, one of 3 shapes, motion direction) much slower to learn than
the audio chords, and audio that is always informative (1.0 vs 0.8 for video) lets the joint model fit
the training set from audio alone, which starves the visual encoder. Plain SGD (the spec default, as in
OGM-GE's official main.py), so the damping coefficient scales the update directly; sum fusion
(logits = fc_a(a) + fc_v(v)) and alpha = 4 over all 12 epochs. Measured on seeds 0-5 (2026-12-03):
visual-only 0.423, normal's visual head 0.272, OGM-GE's 0.344: OGM-GE's visual head +0.072 (95% CI +0.019
to +0.124, p = 0.017), under-use -0.151 (p = 0.004), and OGM-GE's joint accuracy is *lower* than normal's
(-0.142, p = 0.0007): with alpha 4 it trades joint accuracy for the weak head. On seeds 0-4 the visual
gain has p = 0.045; on seeds 0-2 (per seed +0.164 / +0.070 / +0.148, measured 2026-11-30) a paired t over
the seeds is 4.4 on 2 df, p = 0.048, not distinguishable after Holm: six seeds are what the claim needs.

Not tested any more: the visual-dominant set (chords buried in noise, `audio_noise_std` 0.45). Under the
seed-level test its phenomenon does not hold on 6 seeds: the normal model's audio head swings from 0.14 to
0.74 between seeds, so audio vs visual is not distinguishable (-0.132, p = 0.28), nor OGM-GE's audio gain
(+0.069, p = 0.45). README lists it as an open question.
"""
from __future__ import annotations

import html
import multiprocessing
import re
import statistics

import pytest
from mlflow.tracking import MlflowClient

from conftest import fit_on_one_thread
from orchestrator import load_spec
from orchestrator.report import log_sweep_imbalance
from orchestrator.sweep import log_ceiling, trials_frame
from orchestrator.synth import synthesize_dataset
from orchestrator.tracking import finish_run, resolve_tracking_uri
from orchestrator.train_callbacks import MlflowEpochLogger
from orchestrator.training import log_predictions, log_probabilities, start_mlflow_run

pytestmark = pytest.mark.slow

SEEDS = [0, 1, 2, 3, 4, 5]


def sentence(page: str, finding_id: str) -> str:
    match = re.search(rf"<li id='{finding_id}'>(.*?)</li>", page, re.S)
    assert match, f"no finding {finding_id!r} in the report"
    return html.unescape(match.group(1))


def numbers(text: str) -> list[float]:
    """Every decimal number written with three decimals, in order."""
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d{3}\b", text)]


# 16 classes x 20 clips, split 10 train / 8 val / 2 test per class: a large validation split (128 clips)
# keeps the per-seed accuracies from moving in steps of several percent.
CASES = {
    "audio_dominant": dict(
        synth={"audio_informative": 1.0, "visual_informative": 0.8},
        epochs=12, alpha=4.0, dominant="audio", weak="visual"),
}


def run_as_sweep(spec_data: dict, methods: list[dict], seeds: list[int]) -> tuple[str, str, str]:
    """Each (method, seed) trained in-process and logged as one child of a sweep parent run, with the
    params, tags and per-epoch metrics a sweep trial logs. Returns (tracking_uri, parent_run_id, name).
    The trials train two at a time in forked processes (one per core, each on one thread: a trial of
    this tiny model keeps one core busy, not two); MLflow is written from this process only."""
    spec = load_spec(spec_data)
    uri = resolve_tracking_uri(None, spec.storage.runs_dir)
    client = MlflowClient(uri)
    _, parent = start_mlflow_run(client, spec, tags={"avtune.kind": "sweep"}, run_name=f"sweep_{spec.name}")
    log_ceiling(client, parent, spec)  # as run_sweep does: the card's best achievable accuracies
    trials = [{**spec_data, "method": method, "train": {**spec_data["train"], "seed": seed}}
              for method in methods for seed in seeds]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        outcomes = pool.map(fit_on_one_thread, trials, chunksize=1)
    for trial_data, (history, final) in zip(trials, outcomes):
        trial = load_spec(trial_data)
        _, run_id = start_mlflow_run(client, trial, tags={
            "mlflow.parentRunId": parent, "avtune.stage": "main",
            "avtune.trial_id": f"{trial.method.name}_{trial.train.seed}"})
        assert MlflowEpochLogger(uri, run_id).reconcile(history)
        log_predictions(client, run_id, final["predictions"])
        log_probabilities(client, run_id, final["probabilities"])
        finish_run(client, run_id)
    log_sweep_imbalance(client, parent)
    finish_run(client, parent)
    return uri, parent, spec.name


@pytest.mark.parametrize("case", list(CASES))
def test_normal_under_uses_the_weak_modality_and_ogm_ge_recovers_it(tmp_path, case):
    c = CASES[case]
    epochs, weak, dominant = c["epochs"], c["weak"], c["dominant"]
    root = tmp_path / case
    synthesize_dataset(root, layout="avtune", classes=16, clips_per_class=20, clip_seconds=0.5, fps=8, height=32,
                       width=32, seed=0, split_fractions=(0.5, 0.4, 0.1), **c["synth"])
    spec_data = {
        "name": f"phenomenon_{case}",
        "data": {"source": "dataset", "root": str(root), "cache_dir": str(tmp_path / "cache"),
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8, "fusion": "sum"},
        "method": {"name": "ogm_ge", "alpha": c["alpha"], "modulation_starts": 0, "modulation_ends": epochs},
        "train": {"epochs": epochs, "global_batch_size": 16, "optimizer": "sgd", "learning_rate": 0.02, "momentum": 0.9,
                  "weight_decay": 1e-4},
        "storage": {"runs_dir": str(tmp_path / "runs")},
    }
    methods = [{"name": "normal"}, spec_data["method"], {"name": f"{weak}_only"}]
    tracking_uri, parent_run_id, name = run_as_sweep(spec_data, methods, c.get("seeds", SEEDS))
    client = MlflowClient(tracking_uri)
    trials = trials_frame(client, parent_run_id)
    assert (trials["status"] == "FINISHED").all(), trials[["run_name", "status"]]
    n = len(c.get("seeds", SEEDS))
    assert trials.groupby("method").size().to_dict() == {"normal": n, "ogm_ge": n, f"{weak}_only": n}
    assert (trials["epochs"] == epochs).all()

    def mean(method: str, key: str) -> float:
        return statistics.mean(trials.loc[trials["method"] == method, key].astype(float))

    normal_weak, ogm_weak = mean("normal", f"acc_{weak}"), mean("ogm_ge", f"acc_{weak}")
    weak_alone = mean(f"{weak}_only", "acc")
    shown = trials[["run_name", "acc", "acc_audio", "acc_visual"]].to_string()
    # Each claim is the report's own verdict: a paired test on the same seeds and validation clips (each
    # trial's logged predictions.csv), Holm-adjusted within its family.
    from orchestrator.report import imbalance_summary, load_sweep
    from orchestrator.report.comparisons import report_tests, find_test, weak_modality

    sweep = load_sweep(client, parent_run_id)
    table = imbalance_summary(sweep)[0]
    tests = report_tests(table, sweep.predictions)
    ogm_config = table.loc[table["method"] == "ogm_ge", "config"].iloc[0]
    # 1. The dominant modality's head is above the weak one's in the joint model.
    assert weak_modality(tests, "") == weak, (tests.drop(columns="result").to_string(), shown)
    # 2. Under-use of the weak modality: the joint model's weak head ends below the weak modality alone.
    under = find_test(tests, "weak_vs_unimodal", "", "normal", f"acc_{weak}")
    assert under.n_seeds == n and under.n_clips == 128 and "seed x clip paired t" in under.method
    assert under.difference == pytest.approx(normal_weak - weak_alone, abs=1e-9)
    assert under.distinguishable and under.difference < 0, (under, shown)
    # 3. OGM-GE recovers part of it.
    recovered = find_test(tests, "vs_normal", "", ogm_config, f"acc_{weak}")
    assert recovered.difference == pytest.approx(ogm_weak - normal_weak, abs=1e-9)
    assert recovered.distinguishable and recovered.difference > 0, (recovered, shown)

    # The report states the same in words, from MLflow alone.
    from orchestrator.report import build_report

    html_path = build_report(name, parent_run_id, tracking_uri, out_dir=tmp_path / "report",
                             log_to_mlflow=False)
    text = html_path.read_text()
    assert sentence(text, "dominance").startswith(f"{dominant.capitalize()} is the dominant modality")
    under_use = sentence(text, "weak_vs_unimodal")
    assert f"{weak} head reaches" in under_use and f"below the {weak}_only baseline" in under_use
    assert numbers(under_use)[:2] == pytest.approx([normal_weak, weak_alone], abs=6e-4)
    recovered = sentence(text, "ogm_vs_normal")
    assert f"raises the {weak} head's accuracy" in recovered
    assert numbers(recovered)[:2] == pytest.approx([normal_weak, ogm_weak], abs=6e-4)
    print(f"\n{case}: {weak}_only {weak_alone:.3f}  normal {weak} head {normal_weak:.3f}  "
          f"ogm_ge {weak} head {ogm_weak:.3f}\n{shown}")


# Complementary modalities (issue 27): 70% of the clips carry their class's signature in each modality, drawn
# independently, and the others carry none there (noise only), so the two together can name the class far
# more often than either alone. The weak modality is slower to learn (noise on its signature). 6 classes x 40
# clips split 20 / 16 / 4: 96 validation clips; card (validation): audio 0.750, visual 0.750, both 0.948.
COMPLEMENTARY = {
    "audio_dominant": dict(synth={"visual_noise_std": 30.0}, dominant="audio"),
    "visual_dominant": dict(synth={"audio_noise_std": 0.45}, dominant="visual"),
}
COMPLEMENTARY_SEEDS = [0, 1, 2, 3, 4]


@pytest.mark.parametrize("case", list(COMPLEMENTARY))
def test_on_complementary_clips_normal_leaves_joint_accuracy_below_the_ceiling(tmp_path, case):
    """The benchmark leaves something to win: on complementary clips the normal joint model ends measurably
    below the card's best achievable joint accuracy, in both dominance directions, and below the late-fusion
    ensemble of the two uni-modal models where its weak modality is audio. Each claim is the report's own
    verdict (the `headroom` family: the ensemble paired with normal on seeds and clips, the ceiling by a t
    over the seeds of ceiling - normal_s, Holm over the family).

    Measured (2026-12-03, seeds 0-4): audio-dominant normal 0.856, ensemble 0.858, ceiling 0.948;
    visual-dominant normal 0.777, ensemble 0.827, ceiling 0.948. With video the weak modality the
    ensemble is not distinguishable from normal on this small set (five settings tried, +0.002 to +0.019);
    on the demo's larger one it was +0.030 (experiments/demo.yaml), so it is not asserted here."""
    c = COMPLEMENTARY[case]
    root = tmp_path / case
    card = synthesize_dataset(root, layout="avtune", classes=6, clips_per_class=40, clip_seconds=1.0, fps=8,
                              height=32, width=32, audio_informative=0.7, visual_informative=0.7,
                              audio_uninformative="no_signature", visual_uninformative="no_signature", seed=0,
                              split_fractions=(0.5, 0.4, 0.1), **c["synth"])
    best = card["best_achievable_accuracy"]["val"]
    assert best["audio_visual"] > max(best["audio"], best["visual"]) + 0.15  # complementary by construction
    spec_data = {
        "name": f"complementary_{case}",
        "data": {"source": "dataset", "root": str(root), "cache_dir": str(tmp_path / "cache"),
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 1.0}},
        "model": {"width": 8, "fusion": "concat"},
        "method": {"name": "normal"},
        "train": {"epochs": 6, "global_batch_size": 16, "optimizer": "adam", "learning_rate": 0.001},
        "storage": {"runs_dir": str(tmp_path / "runs")},
    }
    methods = [{"name": "normal"}, {"name": "audio_only"}, {"name": "visual_only"}]
    tracking_uri, parent_run_id, name = run_as_sweep(spec_data, methods, COMPLEMENTARY_SEEDS)

    from orchestrator.report import imbalance_summary, load_sweep
    from orchestrator.report.comparisons import find_test, report_tests, weak_modality
    from orchestrator.report.references import CEILING

    sweep = load_sweep(MlflowClient(tracking_uri), parent_run_id)
    assert sweep.parent_metrics["ceiling_acc"] == pytest.approx(best["audio_visual"])
    table = imbalance_summary(sweep)[0]
    references = sweep.references()
    tests = report_tests(table, sweep.predictions, references)
    shown = table[["run_name", "acc", "acc_audio", "acc_visual"]].to_string()
    assert weak_modality(tests, "") == ("visual" if c["dominant"] == "audio" else "audio"), shown
    normal = table.loc[table["method"] == "normal", "acc"].astype(float)
    ceiling = find_test(tests, "headroom", "", CEILING, "acc")
    assert ceiling.n_seeds == len(COMPLEMENTARY_SEEDS)
    assert ceiling.difference == pytest.approx(best["audio_visual"] - normal.mean(), abs=1e-9)
    assert ceiling.distinguishable and ceiling.difference > 0, (ceiling, shown)
    ensemble = references.ensembles[""]
    # The ensemble's accuracy per seed, recomputed here from its fused probabilities and the labels.
    labels = sweep.predictions[table.loc[table["method"] == "audio_only", "run_id"].iloc[0]]["label"]
    for seed, (clips, probs) in ensemble.probabilities.items():
        assert ensemble.accuracy()[seed] == pytest.approx(
            float((probs.argmax(1) == labels.loc[clips].to_numpy()).mean()))
    versus_ensemble = find_test(tests, "headroom", "", ensemble.config, "acc")
    assert versus_ensemble.n_clips == 96 and "seed x clip paired t" in versus_ensemble.method
    if c["dominant"] == "visual":
        assert versus_ensemble.distinguishable and versus_ensemble.difference > 0, (versus_ensemble, shown)
    print(f"\n{case}: normal {normal.mean():.3f}  ensemble {statistics.mean(ensemble.accuracy().values()):.3f}  "
          f"ceiling {best['audio_visual']:.3f}\n{shown}")
