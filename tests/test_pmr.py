"""PMR (Fan et al., CVPR 2023): each formula of models/pmr.py against numbers worked out by hand, the
method's loss on hand-picked features, its section's validation, and short engine runs that check
the prototypes and the per-epoch internals."""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from models.outputs import AVOutput
from models.pmr import (
    class_feature_sums,
    momentum_prototypes,
    pmr_coefficients_from_scores,
    pmr_loss,
    prototype_entropy,
    prototype_logits,
    prototype_scores,
    prototype_subset,
    prototypes_from_sums,
    prototypical_cross_entropy,
)

# Two classes at distances 1 and 2: p = softmax(-1, -2) = (s, 1 - s) with s = 1 / (1 + e^-1).
S = 1 / (1 + math.exp(-1))  # 0.7310585786
PCE_NEAR = math.log(1 + math.exp(-1))  # -ln s = 0.3132616875
PCE_FAR = PCE_NEAR + 1  # -ln(1 - s) = -ln(s e^-1) = 1.3132616875
# H(s, 1 - s) = s * PCE_NEAR + (1 - s) * PCE_FAR = PCE_NEAR + (1 - s) = 0.5822031089
H_NEAR_FAR = PCE_NEAR + (1 - S)


# ---- prototypes (Eq. 6, 12) -------------------------------------------------------------------


def test_prototypes_are_class_centroids_of_a_toy_batch():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    y = torch.tensor([0, 0, 1, 1])
    sums, counts = class_feature_sums(z, y, num_classes=3)
    torch.testing.assert_close(sums, torch.tensor([[4.0, 0.0], [0.0, 6.0], [0.0, 0.0]]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 2.0, 0.0]))
    # c_0 = ((1,0) + (3,0)) / 2 = (2,0); c_1 = ((0,2) + (0,4)) / 2 = (0,3); class 2 has no clip: zero vector ...
    torch.testing.assert_close(prototypes_from_sums(sums, counts), torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
    # ... or its previous prototype, never the official 0/0 = NaN.
    previous = torch.tensor([[9.0, 9.0], [9.0, 9.0], [5.0, -5.0]])
    torch.testing.assert_close(prototypes_from_sums(sums, counts, previous),
                               torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, -5.0]]))


def test_rank_shards_sum_to_the_whole_subset():
    """DDP: each rank sums its share (subset[rank::world]); the all-reduced sums equal one process's."""
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1, 1, 0])
    whole = class_feature_sums(z, y, 2)
    parts = [class_feature_sums(z[r::2], y[r::2], 2) for r in range(2)]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole[0])
    torch.testing.assert_close(parts[0][1] + parts[1][1], whole[1])
    # c_0 = ((1,0) + (3,0) + (5,5)) / 3 = (3, 5/3)
    torch.testing.assert_close(prototypes_from_sums(*whole)[0], torch.tensor([3.0, 5 / 3]))


def test_momentum_update_keeps_epsilon_of_the_old_prototype():
    new, old = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    # (1 - 0.25) * (2, 0) + 0.25 * (0, 4) = (1.5, 1.0)
    torch.testing.assert_close(momentum_prototypes(new, old, 0.25), torch.tensor([[1.5, 1.0]]))
    torch.testing.assert_close(momentum_prototypes(new, old, 0.0), new)
    with pytest.raises(ValueError, match="momentum"):
        momentum_prototypes(new, old, 1.0)


def test_prototype_subset_is_seeded_covers_every_class_and_has_no_repeats():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    draw = lambda frac, seed: prototype_subset(labels, frac, 3, torch.Generator().manual_seed(seed))  # noqa: E731
    half = draw(0.5, 0)
    assert half.numel() in (5, 6, 7) and len(set(half.tolist())) == half.numel()  # floor(0.5 * 10) + missing classes
    assert torch.equal(half, draw(0.5, 0))  # same seed, same subset: every rank, and a resumed run
    tiny = draw(0.1, 3)  # floor(0.1 * 10) = 1 clip, plus one clip of each class it missed
    assert tiny.numel() == 3 and set(labels[tiny].tolist()) == {0, 1, 2}
    assert draw(1.0, 5).sort().values.tolist() == list(range(10))


# ---- prototype classifier, PCE (Eq. 7, 9) and entropy (Eq. 13) ---------------------------------


def test_prototype_logits_are_negative_euclidean_distances():
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0]], requires_grad=True)
    c = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    logits = prototype_logits(z, c)
    # row 0: |(0,0)-(1,0)| = 1, |(0,0)-(0,2)| = 2, |(0,0)-(3,4)| = 5
    # row 1: |(3,4)-(1,0)| = sqrt(4+16), |(3,4)-(0,2)| = sqrt(9+4), on the prototype itself: 0
    expected = -torch.tensor([[1.0, 2.0, 5.0], [math.sqrt(20), math.sqrt(13), 0.0]])
    torch.testing.assert_close(logits, expected)
    logits.sum().backward()
    assert torch.isfinite(z.grad).all()  # a feature exactly on a prototype has no NaN gradient
    # d/dz of -(|z - c_0| + |z - c_1| + |z - c_2|) at z = (0,0): unit vectors towards each prototype
    torch.testing.assert_close(z.grad[0], torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0]) + torch.tensor([0.6, 0.8]))


def test_pce_on_hand_picked_distances():
    logits = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])  # distances 1 and 2 to the two prototypes
    assert prototypical_cross_entropy(logits[:1], torch.tensor([0])).item() == pytest.approx(PCE_NEAR)  # 0.31326
    assert prototypical_cross_entropy(logits[:1], torch.tensor([1])).item() == pytest.approx(PCE_FAR)  # 1.31326
    # batch mean: (0.31326 + 1.31326) / 2
    assert prototypical_cross_entropy(logits, torch.tensor([0, 1])).item() == pytest.approx((PCE_NEAR + PCE_FAR) / 2)


def test_entropy_of_the_prototype_distribution():
    assert prototype_entropy(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(math.log(2))  # uniform: ln 2
    assert prototype_entropy(torch.tensor([[-1.0, -2.0]])).item() == pytest.approx(H_NEAR_FAR)  # 0.58220
    both = torch.tensor([[0.0, 0.0], [-1.0, -2.0]])
    assert prototype_entropy(both).item() == pytest.approx((math.log(2) + H_NEAR_FAR) / 2)  # batch mean
    assert prototype_entropy(torch.tensor([[0.0, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)  # one-hot: 0, no NaN


# ---- imbalance ratio and coefficients (Eq. 8, 11) ----------------------------------------------


def test_scores_sum_the_true_class_probability_over_the_batch():
    la = torch.tensor([[-1.0, -2.0], [0.0, 0.0]])
    lv = torch.tensor([[-2.0, -1.0], [-2.0, -1.0]])
    s_a, s_v = prototype_scores(la, lv, torch.tensor([0, 1]))
    assert s_a.item() == pytest.approx(S + 0.5)  # 0.73106 + 0.5
    assert s_v.item() == pytest.approx((1 - S) + S)  # 0.26894 + 0.73106 = 1


@pytest.mark.parametrize("s_a,s_v,rule,ratio,beta,gamma", [
    # rho = 1.2 / 2 = 0.6 < 1: audio slow. Official: beta = 1. Eq. 11: beta = 1/0.6 - 1 = 2/3.
    (1.2, 2.0, "indicator", 0.6, 1.0, 0.0),
    (1.2, 2.0, "clipped_ratio", 0.6, 2 / 3, 0.0),
    # rho = 1.5: visual slow. Official: gamma = 1. Eq. 11: gamma = 1.5 - 1 = 0.5.
    (1.5, 1.0, "indicator", 1.5, 0.0, 1.0),
    (1.5, 1.0, "clipped_ratio", 1.5, 0.0, 0.5),
    # rho = 3: gamma = clip(3 - 1) = 1; rho = 0.25: beta = clip(4 - 1) = 1.
    (3.0, 1.0, "clipped_ratio", 3.0, 0.0, 1.0),
    (1.0, 4.0, "clipped_ratio", 0.25, 1.0, 0.0),
    # tie: neither modality is modulated (official else-branch; Eq. 11 gives clip(0) = 0).
    (2.0, 2.0, "indicator", 1.0, 0.0, 0.0),
    (2.0, 2.0, "clipped_ratio", 1.0, 0.0, 0.0),
])
def test_ratio_and_coefficients(s_a, s_v, rule, ratio, beta, gamma):
    c = pmr_coefficients_from_scores(torch.tensor(s_a), torch.tensor(s_v), rule)
    assert c.ratio_av.item() == pytest.approx(ratio)
    assert c.accel_audio.item() == pytest.approx(beta)
    assert c.accel_visual.item() == pytest.approx(gamma)


def test_underflowed_scores_give_no_nan():
    c = pmr_coefficients_from_scores(torch.tensor(0.0), torch.tensor(0.0))
    assert c.ratio_av.item() == 1.0 and c.accel_audio.item() == 0.0 and c.accel_visual.item() == 0.0
    with pytest.raises(ValueError, match="rule"):
        pmr_coefficients_from_scores(torch.tensor(1.0), torch.tensor(1.0), "paper")


# ---- the combined loss (Eq. 10, 13) ------------------------------------------------------------


def test_loss_adds_slow_pce_and_subtracts_dominant_entropy():
    c = pmr_coefficients_from_scores(torch.tensor(1.0), torch.tensor(2.0), "clipped_ratio")  # rho 0.5: beta 1, gamma 0
    t = torch.tensor
    args = (t(1.0), t(0.5), t(0.8), t(0.6), t(0.4), c)
    # 1 + alpha*beta*0.5 + alpha*gamma*0.8 - mu*gamma*0.6 - mu*beta*0.4 = 1 + 2*0.5 - 0.1*0.4 = 1.96
    assert pmr_loss(*args, pce_weight=2.0, entropy_weight=0.1, entropy_on=True).item() == pytest.approx(1.96)
    assert pmr_loss(*args, pce_weight=2.0, entropy_weight=0.1, entropy_on=False).item() == pytest.approx(2.0)
    c = pmr_coefficients_from_scores(torch.tensor(1.5), torch.tensor(1.0), "clipped_ratio")  # beta 0, gamma 0.5
    # 1 + 2*0.5*0.8 - 0.1*0.5*0.6 = 1.8 - 0.03 = 1.77
    assert pmr_loss(t(1.0), t(0.5), t(0.8), t(0.6), t(0.4), c, 2.0, 0.1, True).item() == pytest.approx(1.77)


class _Model(torch.nn.Module):
    has_probe_heads = False


def _method(**section):
    from workers.engine import Runtime
    from workers.methods import get_method
    from workers.specs import load_spec

    spec = load_spec({"method": {"name": "pmr", **section}, "train": {"epochs": 3}})
    method = get_method("pmr")(spec, Runtime())
    method.model = _Model()
    method.rebalance = True
    method.entropy_on = True
    return method


def test_method_loss_on_hand_picked_features():
    """Audio's sample sits at distances (1, 2) from its prototypes, visual's at (2, 1): p_a(y) = s, p_v(y) = 1 - s,
    rho = s / (1 - s) = e > 1, so visual is slow: gamma = 1 (both rules), beta = 0."""
    from workers.engine import Batch

    method = _method(pce_weight=2.0, entropy_weight=0.1)
    z = torch.zeros(1, 2, requires_grad=True)
    method.prototypes = {"audio": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "visual": torch.tensor([[2.0, 0.0], [0.0, 1.0]])}
    logits = torch.tensor([[0.0, 0.0]])  # fused CE = ln 2
    batch = Batch(None, None, torch.tensor([0]), torch.tensor([0]))
    sums = defaultdict(float)
    method._features = (z, z)
    loss = method.loss(AVOutput(logits, logits, logits), batch, sums)
    # ln 2 + alpha * gamma * PCE_v - mu * gamma * H_a = 0.69315 + 2 * 1.31326 - 0.1 * 0.58220
    assert loss.item() == pytest.approx(math.log(2) + 2 * PCE_FAR - 0.1 * H_NEAR_FAR)
    assert sums["pmr_ratio_av"].item() == pytest.approx(math.e)
    assert sums["pmr_pce_weight_visual"].item() == pytest.approx(2.0) and sums["pmr_pce_weight_audio"].item() == 0
    assert sums["pmr_entropy_weight_audio"].item() == pytest.approx(0.1) and sums["pmr_entropy_weight_visual"].item() == 0
    assert sums["loss_pce_audio"].item() == pytest.approx(PCE_NEAR) and sums["entropy_proto_visual"].item() == pytest.approx(H_NEAR_FAR)

    # Outside the window: the plain cross-entropy (official), the PCE terms only logged.
    method.rebalance = method.entropy_on = False
    method._features = (z, z)
    sums = defaultdict(float)
    assert method.loss(AVOutput(logits, logits, logits), batch, sums).item() == pytest.approx(math.log(2))
    assert sums["pmr_pce_weight_visual"] == 0 and sums["loss_pce_visual"].item() == pytest.approx(PCE_FAR)


# ---- the section ------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("pce_weight", -1.0), ("entropy_weight", -0.1), ("entropy_epochs", -1), ("prototype_momentum", 1.0),
    ("prototype_subset_fraction", 0.0), ("prototype_subset_fraction", 1.5), ("coefficient_rule", "paper"),
    ("rebalance_start_epoch", -1), ("alpha", 1.0),
])
def test_bad_section_values_name_the_field(field, value):
    from orchestrator.specs import SpecError, load_spec

    with pytest.raises(SpecError, match=rf"method\.{field}"):
        load_spec({"method": {"name": "pmr", field: value}})


def test_window_and_spec_problems_name_the_fields():
    from orchestrator.specs import SpecError, load_spec

    with pytest.raises(SpecError, match=r"rebalance_end_epoch \(2\) must be greater than method\.rebalance_start_epoch"):
        load_spec({"method": {"name": "pmr", "rebalance_start_epoch": 2, "rebalance_end_epoch": 2}})
    with pytest.raises(SpecError, match=r"rebalance_start_epoch \(3\) must be below train\.epochs \(3\)"):
        load_spec({"method": {"name": "pmr", "rebalance_start_epoch": 3}, "train": {"epochs": 3}})


def test_run_params_say_what_the_spec_does_not():
    from orchestrator.specs import load_spec
    from workers.methods import get_method

    cls = get_method("pmr")
    gated = load_spec({"method": {"name": "pmr"}, "model": {"fusion": "gated"}})
    assert cls.run_params(gated)["pmr_features"] == "gated_fusion_projections"
    assert cls.run_params(gated)["pmr_entropy_term"] == "paper_eq13"
    official = load_spec({"method": {"name": "pmr", "entropy_weight": 0}})
    assert cls.run_params(official) == {"pmr_features": "encoder_outputs",
                                        "pmr_prototype_subset": "seeded_uniform_0.1+1_per_missing_class",
                                        "pmr_entropy_term": "off_as_official_code"}
    assert set(cls.run_params(official)) == set(cls.run_param_keys)
    assert "alpha" not in cls.label_fields


# ---- through the engine -------------------------------------------------------------------------


def test_prototypes_are_the_class_means_of_the_training_features(synth_dataset, tmp_path):
    """With the whole split as the subset, the prototypes of epoch 0 are the per-class means of the
    encoder features of every training clip, in eval mode."""
    from test_engine import engine_spec
    from workers.engine import Runtime, build_datasets, build_loaders
    from workers.methods import get_method

    spec = engine_spec(synth_dataset, tmp_path / "cache", "pmr", prototype_subset_fraction=1.0)
    torch.manual_seed(0)
    datasets = build_datasets(spec)
    method = get_method("pmr")(spec, Runtime())
    model = method.build_model(datasets["train"].num_classes)
    method.loaders = build_loaders(spec, datasets, Runtime())
    method.setup(model, datasets)
    method.start_epoch(0)
    assert method.prototype_clips == len(datasets["train"])
    model.eval()
    with torch.no_grad():
        a, v, y = zip(*[(x[0], x[1], x[2]) for x in datasets["train"]])
        za, zv = model.audio_encoder(torch.stack(a)), model.visual_encoder(torch.stack(v))
    y = torch.stack(y)
    for k in range(3):
        torch.testing.assert_close(method.prototypes["audio"][k], za[y == k].mean(0))
        torch.testing.assert_close(method.prototypes["visual"][k], zv[y == k].mean(0))
    assert method.prototypes["audio"].shape == (3, model.audio_encoder.out_dim)


def test_engine_logs_pmr_internals_every_epoch(synth_dataset, tmp_path):
    from test_engine import Recorder, engine_spec
    from workers.engine import fit

    recorder = Recorder()
    spec = engine_spec(synth_dataset, tmp_path / "cache", "pmr", epochs=2, entropy_epochs=1, pce_weight=2.0,
                       entropy_weight=0.05, rebalance_end_epoch=2, prototype_momentum=0.5)
    fit(spec, report=recorder)
    for m in recorder.metrics:
        for key in ("pmr_ratio_av", "pmr_audio_slow", "loss_pce_audio", "loss_pce_visual", "entropy_proto_audio",
                    "entropy_proto_visual", "acc_audio_proto", "acc_visual_proto", "pmr_prototype_clips"):
            assert key in m and math.isfinite(m[key]), key
        assert m["pmr_ratio_av"] > 0 and 0 <= m["acc_audio_proto"] <= 1
        # Official rule: exactly one modality gets alpha per step (no ties), so the means add up to alpha,
        # and audio's share is alpha times the share of steps where audio was the slow one.
        assert m["pmr_pce_weight_audio"] + m["pmr_pce_weight_visual"] == pytest.approx(2.0)
        assert m["pmr_pce_weight_audio"] == pytest.approx(2.0 * m["pmr_audio_slow"])
        assert 0 <= m["entropy_proto_audio"] <= math.log(3) + 1e-6
    assert [m["pmr_rebalance_active"] for m in recorder.metrics] == [1.0, 1.0]
    assert [m["pmr_entropy_active"] for m in recorder.metrics] == [1.0, 0.0]
    # The entropy regulariser damps the dominant modality: mu * (gamma on audio, beta on visual) while active.
    first, second = recorder.metrics
    assert first["pmr_entropy_weight_audio"] + first["pmr_entropy_weight_visual"] == pytest.approx(0.05)
    assert first["pmr_entropy_weight_visual"] == pytest.approx(0.05 * first["pmr_audio_slow"])
    assert second["pmr_entropy_weight_audio"] == second["pmr_entropy_weight_visual"] == 0.0
    # Prototypes are method state: in the checkpoint, for the next epoch, identical after the round trip.
    state = recorder.state(1)["method"]
    assert state["prototypes_for_epoch"] == 2
    assert state["prototypes"]["audio"].shape == (3, 64) and torch.isfinite(state["prototypes"]["visual"]).all()
