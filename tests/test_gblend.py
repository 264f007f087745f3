"""Gradient-Blending: weight estimation on hand-computed loss tables, blended loss, model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import AVOutput, blended_loss, build_gblend_classifier, estimate_blend_weights


def test_weights_on_hand_table():
    at_n = {"audio": (1.0, 1.5), "visual": (1.2, 1.4), "joint": (1.0, 1.3)}
    at_n_plus = {"audio": (0.5, 1.4), "visual": (0.9, 1.2), "joint": (0.6, 1.1)}
    # audio:  O 0.5 -> 0.9, dO = 0.4, dG = 0.1 -> 0.1 / 0.16 = 0.625
    # visual: O 0.2 -> 0.3, dO = 0.1, dG = 0.2 -> 0.2 / 0.01 = 20
    # joint:  O 0.3 -> 0.5, dO = 0.2, dG = 0.2 -> 0.2 / 0.04 = 5
    z = 0.625 + 20.0 + 5.0
    w = estimate_blend_weights(at_n, at_n_plus)
    assert list(w) == ["audio", "visual", "joint"]
    assert w["audio"] == pytest.approx(0.625 / z, rel=1e-9)
    assert w["visual"] == pytest.approx(20.0 / z, rel=1e-9)
    assert w["joint"] == pytest.approx(5.0 / z, rel=1e-9)
    assert sum(w.values()) == pytest.approx(1.0)


def test_fast_overfitting_audio_gets_small_weight():
    # Shaped like the paper's Kinetics observation: the audio head's train loss collapses while
    # its validation loss barely moves (large dO, small dG).
    at_n = {"audio": (3.5, 3.8), "visual": (3.0, 3.2), "joint": (2.9, 3.1)}
    at_n_plus = {"audio": (1.5, 3.7), "visual": (2.4, 2.7), "joint": (2.0, 2.6)}
    raw_audio = 0.1 / 1.9**2  # O 0.3 -> 2.2, dG 0.1
    raw_visual = 0.5 / 0.1**2  # O 0.2 -> 0.3, dG 0.5
    raw_joint = 0.5 / 0.4**2  # O 0.2 -> 0.6, dG 0.5
    z = raw_audio + raw_visual + raw_joint
    w = estimate_blend_weights(at_n, at_n_plus)
    assert w["audio"] == pytest.approx(raw_audio / z, rel=1e-9)
    assert w["visual"] == pytest.approx(raw_visual / z, rel=1e-9)
    assert w["joint"] == pytest.approx(raw_joint / z, rel=1e-9)
    assert w["audio"] < 0.001 < w["joint"] < w["visual"]


def test_no_generalisation_gain_gets_zero_weight():
    at_n = {"audio": (1.0, 1.5), "visual": (1.2, 1.4), "joint": (1.0, 1.3)}
    at_n_plus = {"audio": (0.5, 1.6), "visual": (0.9, 1.2), "joint": (0.6, 1.3)}  # audio val up, joint flat
    w = estimate_blend_weights(at_n, at_n_plus)
    assert w == {"audio": 0.0, "visual": 1.0, "joint": 0.0}


def test_zero_overfitting_change_uses_eps_floor():
    at_n = {"audio": (1.0, 1.5), "visual": (1.0, 2.0)}
    at_n_plus = {"audio": (0.5, 1.4), "visual": (0.5, 1.5)}  # visual: O 1.0 -> 1.0, dO = 0, dG = 0.5
    eps = 1e-4
    raw_audio = 0.1 / 0.4**2
    raw_visual = 0.5 / eps
    w = estimate_blend_weights(at_n, at_n_plus, eps=eps)
    assert w["visual"] == pytest.approx(raw_visual / (raw_audio + raw_visual), rel=1e-9)
    assert w["audio"] == pytest.approx(raw_audio / (raw_audio + raw_visual), rel=1e-9)


def test_all_zero_weights_fall_back_to_uniform():
    at_n = {"audio": (1.0, 1.0), "visual": (1.0, 1.0), "joint": (1.0, 1.0)}
    at_n_plus = {"audio": (0.5, 1.2), "visual": (0.5, 1.0), "joint": (0.4, 1.1)}
    assert estimate_blend_weights(at_n, at_n_plus) == {"audio": 1 / 3, "visual": 1 / 3, "joint": 1 / 3}


def test_estimate_validation():
    good = {"audio": (1.0, 1.5), "visual": (1.0, 1.5), "joint": (1.0, 1.5)}
    with pytest.raises(ValueError, match="losses_at_n_plus must have exactly the keys"):
        estimate_blend_weights(good, {"audio": (1.0, 1.0), "visual": (1.0, 1.0)})
    with pytest.raises(ValueError, match=r"losses_at_n\['joint'\] must be a \(train_loss, val_loss\) pair"):
        estimate_blend_weights({**good, "joint": (1.0,)}, good)
    with pytest.raises(ValueError, match=r"losses_at_n_plus\['audio'\]"):
        estimate_blend_weights(good, {**good, "audio": (float("nan"), 1.0)})
    with pytest.raises(ValueError, match="eps"):
        estimate_blend_weights(good, good, eps=0.0)


def test_blended_loss_by_hand():
    out = AVOutput(
        logits=torch.tensor([[0.0, 0.0]]),
        logits_audio=torch.tensor([[1.0, 0.0]]),
        logits_visual=torch.tensor([[0.0, 2.0]]),
    )
    labels = torch.tensor([0])
    ce_joint = math.log(2.0)
    ce_audio = math.log(1.0 + math.exp(-1.0))
    ce_visual = math.log(1.0 + math.exp(2.0))
    loss = blended_loss(out, labels, {"audio": 0.2, "visual": 0.3, "joint": 0.5})
    assert loss.item() == pytest.approx(0.2 * ce_audio + 0.3 * ce_visual + 0.5 * ce_joint, rel=1e-6)


def test_blended_loss_validation():
    out = AVOutput(torch.zeros(1, 2), torch.zeros(1, 2), None)
    with pytest.raises(ValueError, match="weights must have exactly the keys"):
        blended_loss(out, torch.tensor([0]), {"audio": 1.0, "joint": 1.0})
    with pytest.raises(ValueError, match=r"weights\['visual'\]"):
        blended_loss(out, torch.tensor([0]), {"audio": 1.0, "visual": -0.1, "joint": 1.0})
    with pytest.raises(ValueError, match="logits_visual"):
        blended_loss(out, torch.tensor([0]), {"audio": 1.0, "visual": 1.0, "joint": 1.0})


def test_gblend_classifier_forward_backward():
    torch.manual_seed(0)
    model = build_gblend_classifier(5, width=8)
    assert model.has_probe_heads is False
    audio, visual = torch.randn(2, 1, 100, 40), torch.randn(2, 3, 2, 32, 32)
    out = model(audio, visual)
    assert out.logits.shape == out.logits_audio.shape == out.logits_visual.shape == (2, 5)
    labels = torch.tensor([1, 4])
    # The audio head alone trains the audio encoder (heads are not detached in G-Blend) ...
    F.cross_entropy(out.logits_audio, labels).backward(retain_graph=True)
    assert model.audio_encoder.conv1.weight.grad.abs().sum() > 0
    assert model.visual_encoder.conv1.weight.grad is None
    model.zero_grad(set_to_none=True)
    # ... and the blended loss reaches every head and both encoders.
    blended_loss(out, labels, {"audio": 0.2, "visual": 0.3, "joint": 0.5}).backward()
    for head in (model.audio_head, model.visual_head, model.joint_head):
        assert head.weight.grad.abs().sum() > 0
    assert model.visual_encoder.conv1.weight.grad.abs().sum() > 0


def test_gblend_joint_head_sees_audio_then_visual():
    torch.manual_seed(0)
    model = build_gblend_classifier(3, audio_arch="resnet10", visual_arch="resnet10", width=4).eval()
    d = model.audio_encoder.out_dim
    weight = torch.zeros(3, 2 * d)
    weight[0, :d] = 1.0  # class 0 reads audio only
    weight[1, d:] = 1.0  # class 1 reads visual only
    with torch.no_grad():
        model.joint_head.weight.copy_(weight)
        model.joint_head.bias.copy_(torch.tensor([0.0, 0.0, 7.0]))
        audio, visual = torch.randn(2, 1, 64, 32), torch.randn(2, 3, 2, 32, 32)
        a, v = model.audio_encoder(audio), model.visual_encoder(visual)
        out = model(audio, visual)
    torch.testing.assert_close(out.logits[:, 0], a.sum(1))
    torch.testing.assert_close(out.logits[:, 1], v.sum(1))
    torch.testing.assert_close(out.logits[:, 2], torch.full((2,), 7.0))


# ---- the weights' source: never silently uniform ----------------------------------------------


def _gblend_spec(**method):
    from orchestrator.specs import load_spec

    return load_spec({"method": {"name": "gblend", **method}})


@pytest.mark.parametrize("method,source", [
    ({"weights": "uniform"}, "uniform"),
    ({"weights": {"audio": 1, "visual": 1, "joint": 2}}, "given"),
    ({"weights": {"audio": 1, "visual": 1, "joint": 2}, "weights_source": "estimation_stage"}, "estimated"),
    ({"mode": "online"}, "uniform+online"),
    ({"weights": {"audio": 1, "visual": 1, "joint": 1}, "weights_source": "estimation_fallback"}, "uniform_fallback"),
])
def test_every_gblend_run_logs_where_its_weights_came_from(method, source):
    from workers.methods import get_method

    assert get_method("gblend").run_params(_gblend_spec(**method)) == {"gblend_weights_source": source}


def test_single_training_refuses_weights_to_estimate_before_anything_runs(tmp_path):
    from orchestrator.specs import SpecError
    from orchestrator.training import run_training
    from workers.engine import Runtime
    from workers.methods import get_method

    spec = _gblend_spec().model_copy(update={"storage": _gblend_spec().storage.model_copy(update={"runs_dir": tmp_path})})
    with pytest.raises(SpecError, match=r"method\.weights: gblend with weights 'estimate' needs the estimation stage"):
        run_training(spec)
    assert not any(tmp_path.iterdir()), "nothing is generated or logged for a refused spec"
    # The engine, too, refuses rather than blend with 1/3 each.
    method = get_method("gblend")(spec, Runtime())
    with pytest.raises(ValueError, match="needs the estimation stage"):
        method.setup(None, {})


def test_sweep_marks_estimated_weights_in_the_trial_spec():
    from orchestrator.specs import load_spec
    from orchestrator.sweep import build_param_space

    spec = load_spec({"method": {"name": "ogm_ge", "modulation_ends": 3}, "train": {"epochs": 3},
                      "search": {"compare": ["normal", "gblend"]}})
    (gblend,) = [m for m in build_param_space(spec, {"audio": 0.2, "visual": 0.3, "joint": 0.5})["method"]["grid_search"]
                 if m["name"] == "gblend"]
    assert gblend["weights"] == {"audio": 0.2, "visual": 0.3, "joint": 0.5}
    assert gblend["weights_source"] == "estimation_stage"


def test_estimation_stage_uses_the_compared_gblend_sections_epochs():
    """The stage measures at the N and N + n of the G-Blend that needs it, also when G-Blend is only
    compared (its fields from search.space), never a fixed 2 and 2."""
    from orchestrator.specs import SpecError, load_spec
    from orchestrator.sweep import estimation_epochs

    spec = load_spec({"method": {"name": "ogm_ge", "modulation_ends": 3}, "train": {"epochs": 3},
                      "search": {"compare": ["normal", "gblend"], "space": {
                          "method.estimate_epochs": {"grid": [1]}, "method.estimate_window_epochs": {"grid": [3]}}}})
    assert estimation_epochs(spec) == (1, 3)
    own = load_spec({"method": {"name": "gblend", "estimate_epochs": 4, "estimate_window_epochs": 1},
                     "search": {"compare": ["normal", "gblend"]}})
    assert estimation_epochs(own) == (4, 1)
    two = load_spec({"method": {"name": "gblend"}, "search": {"compare": ["gblend"], "space": {
        "method.estimate_epochs": {"grid": [1, 2]}}}})
    with pytest.raises(SpecError, match="different estimation epochs"):
        estimation_epochs(two)


# ---- the estimation window: every head must still generalise over it --------------------------

# (train_loss, val_loss) after epochs 1..4, per head.
HISTORIES = {
    "audio": [(0.9, 1.0), (0.6, 0.8), (0.4, 0.7), (0.3, 0.75)],   # val stops falling after epoch 3
    "visual": [(1.1, 1.2), (1.0, 1.1), (0.85, 1.0), (0.8, 0.9)],
    "joint": [(1.0, 1.1), (0.7, 0.9), (0.5, 0.85), (0.4, 0.86)],  # val stops falling after epoch 3
}


def test_window_is_the_latest_where_every_heads_validation_loss_falls():
    from models import choose_estimation_window, estimate_from_histories

    val = {h: [v for _, v in rows] for h, rows in HISTORIES.items()}
    assert choose_estimation_window(val, 3, 1) == 2  # 3 -> 4: audio 0.70 -> 0.75, joint 0.85 -> 0.86
    assert choose_estimation_window(val, 2, 2) == 2  # 2 -> 4: audio 0.80 -> 0.75, joint 0.90 -> 0.86 fall
    assert choose_estimation_window({**val, "joint": [1.1, 0.9, 0.92, 0.95]}, 2, 2) == 1  # 2 -> 4 rises; 1 -> 3 falls
    estimate = estimate_from_histories(HISTORIES, 3, 1)
    assert (estimate.start_epochs, estimate.window_epochs, estimate.source) == (2, 1, "estimated")
    assert estimate.stalled == {"audio": (0.7, 0.75), "joint": (0.85, 0.86)}
    # By hand at N = 2, N + n = 3: w ~ dG / dO^2.
    # audio:  dG = 0.80 - 0.70 = 0.10, dO = (0.70 - 0.40) - (0.80 - 0.60) = 0.10  -> 10
    # visual: dG = 1.10 - 1.00 = 0.10, dO = (1.00 - 0.85) - (1.10 - 1.00) = 0.05 -> 40
    # joint:  dG = 0.90 - 0.85 = 0.05, dO = (0.85 - 0.50) - (0.90 - 0.70) = 0.15 -> 0.05 / 0.0225 = 2.2222
    by_hand = {"audio": (0.10, 0.10), "visual": (0.10, 0.05), "joint": (0.05, 0.15)}  # (dG, dO), as below
    assert {h: pytest.approx(d) for h, d in by_hand.items()} == estimate.deltas
    total = 10 + 40 + 0.05 / 0.0225
    assert estimate.weights == pytest.approx({"audio": 10 / total, "visual": 40 / total, "joint": 0.05 / 0.0225 / total})
    assert all(w > 0 for w in estimate.weights.values())


def test_no_window_where_every_head_generalises_falls_back_to_uniform_and_says_which():
    from models import estimate_from_histories
    from orchestrator.sweep import gblend_fallback_message

    rising_joint = {**HISTORIES, "joint": [(1.0, 1.0), (0.8, 1.1), (0.6, 1.2), (0.5, 1.3)]}
    estimate = estimate_from_histories(rising_joint, 3, 1)
    assert estimate.source == "uniform_fallback" and estimate.start_epochs is None
    assert estimate.weights == pytest.approx({"audio": 1 / 3, "visual": 1 / 3, "joint": 1 / 3})
    assert estimate.stalled == {"audio": (0.7, 0.75), "joint": (1.2, 1.3)}
    message = gblend_fallback_message(estimate, 3)
    assert "audio 0.7000 -> 0.7500" in message and "joint 1.2000 -> 1.3000" in message
    assert "uniform" in message and "visual" not in message


def test_window_needs_the_measured_epochs():
    from models import choose_estimation_window

    with pytest.raises(ValueError, match="head 'audio': 2 epochs measured, N \\+ n = 3 needed"):
        choose_estimation_window({"audio": [1.0, 0.9]}, 2, 1)
    with pytest.raises(ValueError, match="N and n must be >= 1"):
        choose_estimation_window({"audio": [1.0, 0.9]}, 0, 1)


def test_sweep_marks_fallback_weights_in_the_trial_spec():
    from orchestrator.specs import load_spec
    from orchestrator.sweep import build_param_space

    spec = load_spec({"method": {"name": "ogm_ge", "modulation_ends": 3}, "train": {"epochs": 3},
                      "search": {"compare": ["normal", "gblend"]}})
    uniform = {"audio": 1 / 3, "visual": 1 / 3, "joint": 1 / 3}
    (gblend,) = [m for m in build_param_space(spec, uniform, None, "estimation_fallback")["method"]["grid_search"]
                 if m["name"] == "gblend"]
    assert gblend["weights_source"] == "estimation_fallback"
