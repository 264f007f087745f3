"""The modality-imbalance phenomenon of Peng et al. (OGM-GE, CVPR 2022, Sec. 1 and Fig. 1), reproduced
end to end (generated mp4 clips -> Ray Tune sweep -> MLflow) on clips whose audio is the dominant modality.

Claims checked, each on means over three seeds:
1. the normal joint model under-uses the weak (visual) modality: its visual head ends below a
   visual-only network trained on the same clips;
2. OGM-GE (damping the dominant modality's encoder gradients, Eq. 10 + Sec. 3.3) raises the visual
   head's accuracy above the normal joint model's.

Settings were found empirically (the train loop's own building blocks without Ray, 6 seeds, two
generated sets; same-seed numbers match the Ray runs exactly). 16 classes make the visual signatures
(hue, one of 3 shapes, motion direction) much slower to learn than the audio chords, and audio that is
always informative (1.0 vs 0.8 for video) lets the joint model fit the training set from audio alone,
which starves the visual encoder. Plain SGD (the spec default, as in OGM-GE's official main.py), so the
damping coefficient scales the update directly; sum fusion (logits = fc_a(a) + fc_v(v)) and alpha = 4 over
all epochs gave the largest and steadiest gain. Over seeds 0-5 on this set: visual-only 0.430 +- 0.035,
normal's visual head 0.271 +- 0.029, OGM-GE's 0.341 +- 0.027, OGM-GE above normal for every seed
(seeds 0-2, used here: 0.430 / 0.260 / 0.346). Modulating only epochs [0, 4) keeps joint accuracy
near normal's (0.96 vs 0.90) for a similar visual gain; the report's window ablation shows this.

The visual-dominant mirror (video always informative, audio 0.6-0.8, also with coarser audio features)
does not produce the phenomenon with these generated clips: the audio chords are learned faster than
any video signature, so audio is never starved (normal's audio head ~= audio-only) and OGM-GE does not
help it. It is therefore not asserted here.
"""
from __future__ import annotations

import html
import re
import statistics

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import load_spec
from orchestrator.sweep import run_sweep, trials_frame
from workers.synth import synthesize_dataset

pytestmark = pytest.mark.slow

SEEDS = [0, 1, 2]
EPOCHS = 8


def sentence(page: str, finding_id: str) -> str:
    match = re.search(rf"<li id='{finding_id}'>(.*?)</li>", page, re.S)
    assert match, f"no finding {finding_id!r} in the report"
    return html.unescape(match.group(1))


def numbers(text: str) -> list[float]:
    """Every decimal number written with three decimals, in order."""
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d{3}\b", text)]


@pytest.fixture(scope="module")
def audio_dominant_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("phenomenon") / "audio_dominant"
    # 16 classes x 20 clips, split 10 train / 8 val / 2 test per class: a large validation split
    # (128 clips) keeps the per-seed accuracies from moving in steps of several percent.
    synthesize_dataset(root, layout="avtune", classes=16, clips_per_class=20, clip_seconds=0.5, fps=8, height=32,
                       width=32, audio_informative=1.0, visual_informative=0.8, seed=0,
                       split_fractions=(0.5, 0.4, 0.1))
    return root


def test_normal_under_uses_the_weak_modality_and_ogm_ge_recovers_it(ray_local, audio_dominant_set, tmp_path):
    spec = load_spec({
        "name": "phenomenon",
        "data": {"source": "dataset", "root": str(audio_dominant_set), "cache_dir": str(tmp_path / "cache"),
                 "decode": {"num_frames": 2, "frame_height": 32, "frame_width": 32, "clip_seconds": 0.5}},
        "model": {"width": 8, "fusion": "sum"},
        "method": {"name": "ogm_ge", "alpha": 4.0, "modulation_starts": 0, "modulation_ends": EPOCHS},
        "train": {"epochs": EPOCHS, "batch_size": 16, "optimizer": "sgd", "learning_rate": 0.02, "momentum": 0.9,
                  "weight_decay": 1e-4},
        "storage": {"runs_dir": str(tmp_path / "runs")},
        "search": {"compare": ["normal", "ogm_ge", "visual_only"], "space": {"train.seed": {"grid": SEEDS}},
                   "max_concurrent_trials": 2},
    })
    result = run_sweep(spec)
    client = MlflowClient(result.tracking_uri)
    trials = trials_frame(client, result.parent_run_id)
    assert (trials["status"] == "FINISHED").all(), trials[["run_name", "status"]]
    assert trials.groupby("method").size().to_dict() == {"normal": 3, "ogm_ge": 3, "visual_only": 3}
    assert (trials["epochs"] == EPOCHS).all()

    def mean(method: str, key: str) -> float:
        return statistics.mean(trials.loc[trials["method"] == method, key].astype(float))

    normal_visual, ogm_visual = mean("normal", "acc_visual"), mean("ogm_ge", "acc_visual")
    visual_alone = mean("visual_only", "acc")
    normal_audio = mean("normal", "acc_audio")
    shown = trials[["run_name", "acc", "acc_audio", "acc_visual"]].to_string()
    # Audio is the dominant modality of the joint model (its head well above the visual one).
    assert normal_audio > normal_visual + 0.2, shown
    # 1. Under-use of the weak modality: the joint model's visual head ends below visual alone.
    assert normal_visual < visual_alone, shown
    # 2. OGM-GE recovers part of it.
    assert ogm_visual > normal_visual, shown

    # The report states the same in words, from MLflow alone.
    from orchestrator.report import build_report

    html_path = build_report("phenomenon", result.parent_run_id, result.tracking_uri, out_dir=tmp_path / "report",
                             log_to_mlflow=False)
    text = html_path.read_text()
    assert sentence(text, "dominance").startswith("Audio is the dominant modality")
    under_use = sentence(text, "weak_vs_unimodal")
    assert "visual head reaches" in under_use and "below the visual_only baseline" in under_use
    assert numbers(under_use)[:2] == pytest.approx([normal_visual, visual_alone], abs=6e-4)
    recovered = sentence(text, "ogm_vs_normal")
    assert "raises the visual head's accuracy" in recovered
    assert numbers(recovered)[:2] == pytest.approx([normal_visual, ogm_visual], abs=6e-4)
    print(f"\nvisual_only {visual_alone:.3f}  normal visual head {normal_visual:.3f}  "
          f"ogm_ge visual head {ogm_visual:.3f}  normal audio head {normal_audio:.3f}\n{shown}")
