"""Where `make demo`'s G-Blend weights come from: the offline estimate (Wang et al., CVPR 2020, Sec. 3.3)
on the demo's generated clips, per seed, with the per-head loss table it uses, and what the blend the
estimate picks does against uniform weights and plain joint training on the same seeds and clips.

    .venv/bin/python benchmarks/gblend_estimate.py [--seeds 0 1 2]

In-process through the engine (no Ray): each estimation head (audio-only, visual-only, joint) trains
for N + n epochs on the demo spec's data; L^T is read two ways, the model's loss on the training split
at the end of epochs N and N + n (`loss_train_eval`, what avtune uses: Sec. 3.2 defines overfitting on
the model at epoch N) and the mean of the mini-batch losses during those epochs (`loss_train`, the
older reading); dG <= 0 is handled two ways, weight 0 (avtune: the paper's w_k ∝ dG_k / dO_k^2 with
weights kept non-negative) and |dG| (BalanceMM's GBlending_trainer.py). Then gblend trains for the
demo's epochs with the weights avtune estimates, with uniform weights, and plain joint training, on the
same seed: joint validation and test accuracy of the best-on-validation epoch.
Prints the tables and writes benchmarks/results/gblend_estimate.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

HEADS = {"audio": "audio_only", "visual": "visual_only", "joint": "normal"}


def trained(spec, method: dict, epochs: int, seed: int, train_split_loss: bool = False) -> list[dict[str, float]]:
    from workers.engine import fit
    from workers.specs import validate_spec

    data = spec.model_dump(mode="json")
    data.update(method=method, search=None)
    data["train"].update(epochs=epochs, seed=seed, train_split_loss=train_split_loss)
    return fit(validate_spec(data, source="gblend_estimate"), report=lambda metrics, state: None)


def weights_from(histories: dict[str, list[dict]], n: int, window: int, train_key: str, delta_g: str) -> dict[str, float]:
    """The estimate from each head's (L^T, L^V) at epochs N and N + n; `delta_g` 'zero' or 'abs' for dG <= 0."""
    raw = {}
    for head, history in histories.items():
        (t0, v0), (t1, v1) = ((history[e][train_key], history[e]["loss"]) for e in (n - 1, n + window - 1))
        dg, do = v0 - v1, (v1 - t1) - (v0 - t0)
        dg = abs(dg) if delta_g == "abs" else max(dg, 0.0)
        raw[head] = dg / max(do * do, 1e-8)
    total = sum(raw.values())
    return {h: (w / total if total > 0 else 1 / len(raw)) for h, w in raw.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    import torch

    from models import estimate_blend_weights
    from orchestrator.training import ensure_data
    from workers.specs import load_spec

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(ROOT / "experiments" / "demo.yaml")
        spec = ensure_data(spec.model_copy(update={"storage": spec.storage.model_copy(update={"runs_dir": Path(tmp)})}))
        gblend = load_spec({"method": {"name": "gblend"}}).method  # the demo's G-Blend: the section's defaults
        n, window = gblend.estimate_epochs, gblend.estimate_window_epochs
        seeds = []
        for seed in args.seeds:
            histories = {h: trained(spec, {"name": m}, n + window, seed, train_split_loss=True) for h, m in HEADS.items()}
            table = {h: {"train_loss_eval_N": hist[n - 1]["loss_train_eval"], "train_loss_running_N": hist[n - 1]["loss_train"],
                         "val_loss_N": hist[n - 1]["loss"],
                         "train_loss_eval_N+n": hist[n + window - 1]["loss_train_eval"],
                         "train_loss_running_N+n": hist[n + window - 1]["loss_train"],
                         "val_loss_N+n": hist[n + window - 1]["loss"]} for h, hist in histories.items()}
            variants = {f"{key}/{dg}": weights_from(histories, n, window, key, dg)
                        for key in ("loss_train_eval", "loss_train") for dg in ("zero", "abs")}
            at = {e: {h: (hist[e]["loss_train_eval"], hist[e]["loss"]) for h, hist in histories.items()} for e in (n - 1, n + window - 1)}
            assert variants["loss_train_eval/zero"] == estimate_blend_weights(at[n - 1], at[n + window - 1])
            outcomes = {}
            for label, method in (("gblend_estimated", {"name": "gblend", "weights": variants["loss_train_eval/zero"]}),
                                  ("gblend_uniform", {"name": "gblend", "weights": "uniform"}),
                                  ("normal", {"name": "normal"})):
                history = trained(spec, method, spec.train.epochs, seed)
                best = max(history, key=lambda m: m["acc"])
                outcomes[label] = {"val_acc": best["acc"], "test_acc": history[-1].get("test_acc"),
                                   "val_acc_audio": best.get("acc_audio"), "val_acc_visual": best.get("acc_visual")}
            seeds.append({"seed": seed, "losses": table, "weights": variants, "outcomes": outcomes})
            print(f"seed {seed}")
            print(f"  {'head':8s}" + "".join(f"{k:>24s}" for k in table["audio"]))
            for head, row in table.items():
                print(f"  {head:8s}" + "".join(f"{v:24.4f}" for v in row.values()))
            for name, w in variants.items():
                print(f"  weights {name:22s} " + "  ".join(f"{h} {v:.3f}" for h, v in w.items()))
            for label, o in outcomes.items():
                print(f"  {label:18s} val acc {o['val_acc']:.3f}  test acc {o['test_acc']:.3f}")
    summary = {label: {"val_acc_mean": statistics.mean(s["outcomes"][label]["val_acc"] for s in seeds),
                       "test_acc_mean": statistics.mean(s["outcomes"][label]["test_acc"] for s in seeds)}
               for label in seeds[0]["outcomes"]}
    print("mean over seeds:", json.dumps(summary, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gblend_estimate.json").write_text(json.dumps(
        {"spec": "experiments/demo.yaml", "N": n, "n": window, "seeds": seeds, "summary": summary}, indent=1))
    print(f"wrote {RESULTS / 'gblend_estimate.json'}")


if __name__ == "__main__":
    main()
