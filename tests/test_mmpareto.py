"""MMPareto (Wei & Hu, ICML 2024): the formulas against numbers worked out by hand, the step against a
literal re-enactment of official MMPareto.py ``train_epoch``, the section's validation, and one engine run."""
from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from models.mmpareto import (
    MMParetoWeights,
    build_mmpareto_classifier,
    combination_weights,
    combine_gradients,
    min_norm_weights,
)
from test_engine import Recorder, engine_spec
from workers.engine import Batch, Runtime, fit
from workers.methods import get_method
from workers.specs import SpecError, load_spec


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (what the engine sets for cpus_per_worker 1) avoids thread
    contention that makes each tiny backward take a second on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def weights(w_multi: float) -> MMParetoWeights:
    return MMParetoWeights(torch.tensor(0.0, dtype=torch.float64), torch.tensor(w_multi, dtype=torch.float64),
                           torch.tensor(1 - w_multi, dtype=torch.float64))


# ---- min-norm weights of two vectors ----------------------------------------------------------------


def test_min_norm_weights_of_a_conflicting_pair_by_hand():
    # g1 = (1, 0), g2 = (-1, 1): <g1,g1> = 1, <g1,g2> = -1, <g2,g2> = 2, interior case:
    # c = (<g2,g2> - <g1,g2>) / (<g1,g1> + <g2,g2> - 2<g1,g2>) = (2 + 1) / (1 + 2 + 2) = 3/5.
    c = min_norm_weights(t(1.0), t(-1.0), t(2.0))
    assert c.item() == pytest.approx(0.6)
    g1, g2 = t(1.0, 0.0), t(-1.0, 1.0)
    w = combination_weights(g1, g2)
    # cos = -1 / (1 * sqrt 2) <= 0: a conflict, so the min-norm weights (0.6, 0.4), not (0.5, 0.5).
    assert w.cos.item() == pytest.approx(-1 / math.sqrt(2))
    assert (w.w_multi.item(), w.w_uni.item()) == pytest.approx((0.6, 0.4))
    # The min-norm point 0.6 g1 + 0.4 g2 = (0.2, 0.4) is orthogonal to g1 - g2 = (2, -1): 0.4 - 0.4 = 0,
    # and has |d|^2 = 0.2 < |(g1 + g2)/2|^2 = 0.25.
    d = w.w_multi * g1 + w.w_uni * g2
    assert d.tolist() == pytest.approx([0.2, 0.4])
    assert torch.dot(d, g1 - g2).item() == pytest.approx(0.0, abs=1e-12)


def test_min_norm_weights_at_the_end_points_follow_the_official_solver():
    # <x1,x2> >= <x1,x1>: the minimum is x1 itself, official weight 0.999 (not 1).
    assert min_norm_weights(t(1.0), t(2.0), t(4.0)).item() == pytest.approx(0.999)
    # <x1,x2> >= <x2,x2>: the minimum is x2, official weight 0.001.
    assert min_norm_weights(t(4.0), t(2.0), t(1.0)).item() == pytest.approx(0.001)
    # A zero multimodal gradient: cosine 0 counts as a conflict (official `if cos > 0`), and
    # <x1,x2> = 0 >= <x1,x1> = 0 gives 0.999.
    w = combination_weights(t(0.0, 0.0), t(1.0, 1.0))
    assert w.cos.item() == 0.0 and w.w_multi.item() == pytest.approx(0.999)
    # Orthogonal (cos exactly 0): interior case c = <g2,g2> / (<g1,g1> + <g2,g2>) = 4 / (1 + 4).
    w = combination_weights(t(1.0, 0.0), t(0.0, 2.0))
    assert w.w_multi.item() == pytest.approx(0.8)


def test_min_norm_weights_are_scale_invariant():
    # Official sums every dot product twice (per tensor and over "concat"): the weights do not change.
    assert min_norm_weights(t(2.0), t(-2.0), t(4.0)).item() == pytest.approx(min_norm_weights(t(1.0), t(-1.0), t(2.0)).item())


def test_agreeing_gradients_get_equal_weights_and_their_plain_sum_times_gamma():
    # g1 = (1, 0), g2 = (1, 1): cos = 1/sqrt 2 > 0 -> (0.5, 0.5); new = 2*0.5 g1 + 2*0.5 g2 = (2, 1)
    # = g1 + g2, so diff = |g1 + g2| / |new| = 1 (not > 1): grad = 1.5 * (2, 1) = (3, 1.5).
    g1, g2 = t(1.0, 0.0), t(1.0, 1.0)
    w = combination_weights(g1, g2)
    assert w.cos.item() == pytest.approx(1 / math.sqrt(2))
    assert (w.w_multi.item(), w.w_uni.item()) == (0.5, 0.5)
    (grad,) = combine_gradients([g1], [g2], w, gamma=1.5)
    assert grad.tolist() == pytest.approx([3.0, 1.5])


def test_conflicting_gradients_are_rescaled_to_the_sums_norm_times_gamma():
    # g1 = (1, 0), g2 = (-1, 1): weights (0.6, 0.4); new = 2 (0.2, 0.4) = (0.4, 0.8), |new| = sqrt 0.8;
    # g1 + g2 = (0, 1), |.| = 1; diff = 1 / sqrt 0.8 = 1.118 > 1, so
    # grad = 1.5 * diff * new = 1.5 * (1/sqrt 5, 2/sqrt 5) = (0.67082, 1.34164), norm 1.5 = gamma |g1 + g2|.
    g1, g2 = t(1.0, 0.0), t(-1.0, 1.0)
    (grad,) = combine_gradients([g1], [g2], combination_weights(g1, g2), gamma=1.5)
    assert grad.tolist() == pytest.approx([1.5 / math.sqrt(5), 3.0 / math.sqrt(5)])
    assert torch.linalg.vector_norm(grad).item() == pytest.approx(1.5)


def test_rescaling_is_per_parameter_tensor():
    # The same pair split into two one-element tensors P1 = (g1[0], g2[0]) = (1, -1), P2 = (0, 1); the
    # weights come from the whole encoder (0.6, 0.4), the rescaling from each tensor alone:
    # P1: new = 2(0.6 - 0.4) = 0.4, |sum| = |1 - 1| = 0, diff = 0 (not > 1): grad = 1.5 * 0.4 = 0.6;
    # P2: new = 2 * 0.4 = 0.8, |sum| = 1, diff = 1.25 > 1: grad = 1.5 * 1.25 * 0.8 = 1.5.
    w = combination_weights(t(1.0, 0.0), t(-1.0, 1.0))
    p1, p2 = combine_gradients([t(1.0), t(0.0)], [t(-1.0), t(1.0)], w, gamma=1.5)
    assert (p1.item(), p2.item()) == pytest.approx((0.6, 1.5))


def test_rescaling_uses_the_given_total_gradient_norm_and_never_makes_nan():
    # grads_sum (official three_norm's param.grad) given: |(0, 3)| = 3, new = (0.4, 0.8) as above,
    # diff = 3 / sqrt 0.8; grad = 1.5 * 3 / sqrt 0.8 * (0.4, 0.8) = 4.5 * (1/sqrt 5, 2/sqrt 5).
    (grad,) = combine_gradients([t(1.0, 0.0)], [t(-1.0, 1.0)], weights(0.6), gamma=1.5, grads_sum=[t(0.0, 3.0)])
    assert grad.tolist() == pytest.approx([4.5 / math.sqrt(5), 9.0 / math.sqrt(5)])
    # new = 2*0.5*1 + 2*0.5*(-1) = 0: official divides by zero; here the tensor gets 0, never NaN.
    for summed in (None, [t(2.0)]):
        (grad,) = combine_gradients([t(1.0)], [t(-1.0)], weights(0.5), gamma=1.5, grads_sum=summed)
        assert grad.item() == 0.0


def test_combination_refuses_vectors_of_different_lengths():
    with pytest.raises(ValueError, match="g_multi and g_uni"):
        combination_weights(t(1.0, 0.0), t(1.0))
    with pytest.raises(ValueError, match="same parameters"):
        combine_gradients([t(1.0)], [], weights(0.5), gamma=1.5)


# ---- the model --------------------------------------------------------------------------------------


def tiny_model(seed: int = 0, fusion: str = "concat"):
    torch.manual_seed(seed)
    return build_mmpareto_classifier(3, fusion=fusion, audio_arch="resnet10", visual_arch="resnet10", width=2)


def tiny_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(4, 1, 16, 16, generator=g)
    visual = torch.randn(4, 3, 2, 16, 16, generator=g)
    return Batch(audio, visual, torch.tensor([0, 1, 2, 1]), torch.arange(4))


def test_model_has_separate_unimodal_heads_and_official_bn_init():
    model = tiny_model()
    batch = tiny_batch()
    out = model(batch.audio, batch.visual)
    assert out.logits.shape == out.logits_audio.shape == out.logits_visual.shape == (4, 3)
    assert not model.has_probe_heads
    # Official head_audio / head_video: each reads its own encoder only, and is not a slice of the joint head.
    assert torch.allclose(out.logits_audio, model.head_audio(model.audio_encoder(batch.audio)))
    other = model(batch.audio, torch.randn_like(batch.visual))
    assert torch.equal(other.logits_audio, out.logits_audio) and not torch.equal(other.logits_visual, out.logits_visual)
    assert not torch.allclose(out.logits, out.logits_audio + out.logits_visual)
    # Official backbone.py: BatchNorm weights ~ N(1, 0.02), not all ones.
    bn = model.audio_encoder.bn1 if hasattr(model.audio_encoder, "bn1") else next(
        m for m in model.audio_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.all(bn.weight == 1) and (bn.weight - 1).abs().max() < 0.2


# ---- the step against a literal official train_epoch step ----------------------------------------


class _GradRecorder:
    """An optimizer stand-in: `step` keeps every parameter's gradient, no update."""

    def __init__(self, model):
        self.model = model
        self.grads = None

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def official_step_grads(model, batch, gamma=1.5):
    """Official MMPareto.py train_epoch, one step, as it is written: three backward passes with
    retain_graph (zero_grad between), the encoders' gradients recorded per parameter, cosine on the
    concatenation, (0.5, 0.5) or the two-vector min-norm weights, the total backward, then the
    per-parameter rescaling. Min-norm via the solver's dot products, "concat" entries included."""
    model.zero_grad(set_to_none=False)
    out = model(batch.audio, batch.visual)
    losses = {"both": F.cross_entropy(out.logits, batch.labels), "audio": F.cross_entropy(out.logits_audio, batch.labels),
              "visual": F.cross_entropy(out.logits_visual, batch.labels)}
    enc = {m: [(n, p) for n, p in model.named_parameters() if n.startswith(f"{m}_encoder.")] for m in ("audio", "visual")}
    recorded = {"audio": {}, "visual": {}}
    for kind, loss in losses.items():
        loss.backward(retain_graph=True)
        for m in ("audio", "visual"):
            if kind in ("both", m):
                grads = {n: p.grad.clone() for n, p in enc[m]}
                grads["concat"] = torch.cat([g.flatten() for g in grads.values()])
                recorded[m][kind] = grads
        model.zero_grad(set_to_none=False)
    k = {}
    for m in ("audio", "visual"):
        a, b = recorded[m]["both"], recorded[m][m]
        if F.cosine_similarity(a["concat"], b["concat"], dim=0) > 0:
            k[m] = (0.5, 0.5)
        else:
            dot = lambda x, y: sum((x[n] * y[n]).sum() for n in x)  # noqa: E731 (over all entries, concat too)
            v11, v12, v22 = dot(a, a), dot(a, b), dot(b, b)
            c = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else float(-(v12 - v22) / (v11 + v22 - 2 * v12))
            k[m] = (c, 1 - c)
    sum(losses.values()).backward()
    for m in ("audio", "visual"):
        for n, p in enc[m]:
            three = torch.norm(p.grad)
            new = 2 * k[m][0] * recorded[m]["both"][n] + 2 * k[m][1] * recorded[m][m][n]
            diff = three / torch.norm(new)
            p.grad = diff * new * gamma if diff > 1 else new * gamma
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, k


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_train_step_gives_the_official_gradients(fusion):
    spec = load_spec({"model": {"fusion": fusion}, "method": {"name": "mmpareto"}})
    method = get_method("mmpareto")(spec, Runtime())
    model = tiny_model(fusion=fusion)
    reference = copy.deepcopy(model)
    method.setup(model, {})
    batch = tiny_batch()
    optimizer = _GradRecorder(model)
    sums = defaultdict(float)
    loss = method.train_step(model, optimizer, batch, 0, 0, sums, contextlib.nullcontext)
    expected, k = official_step_grads(reference, batch)
    assert set(optimizer.grads) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(optimizer.grads[name], grad, rtol=1e-4, atol=1e-7), name
    for m in ("audio", "visual"):
        assert sums[f"mmpareto_w_multi_{m}"].item() == pytest.approx(k[m][0], rel=1e-4)
        assert sums[f"mmpareto_w_uni_{m}"].item() == pytest.approx(k[m][1], rel=1e-4)
        assert sums[f"mmpareto_conflict_rate_{m}"].item() == float(k[m] != (0.5, 0.5))
        assert sums[f"mmpareto_grad_ratio_{m}"].item() >= 1.5 - 1e-4
    assert loss.item() == pytest.approx(
        (sums["loss_train_multi"] + sums["loss_train_audio"] + sums["loss_train_visual"]).item(), rel=1e-6)


# ---- the spec section -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.5, 11, "big"])
def test_bad_magnitude_scale_is_refused_naming_the_field(value):
    with pytest.raises(SpecError, match=r"method\.magnitude_scale"):
        load_spec({"method": {"name": "mmpareto", "magnitude_scale": value}})


def test_unknown_field_is_refused_and_labels_and_params_describe_the_run():
    with pytest.raises(SpecError, match=r"method\.gamma"):
        load_spec({"method": {"name": "mmpareto", "gamma": 1.5}})
    spec = load_spec({"method": {"name": "mmpareto"}})
    cls = get_method("mmpareto")
    assert spec.method.magnitude_scale == 1.5
    assert cls.run_label(spec.method) == ["gamma1.5"]
    assert cls.run_params(spec) == {"mmpareto_joint_head": "concat (official)"}
    film = load_spec({"model": {"fusion": "film"}, "method": {"name": "mmpareto"}})
    assert cls.run_params(film) == {"mmpareto_joint_head": "film (official: concat)"}


# ---- through the engine -----------------------------------------------------------------------------


def test_engine_logs_the_conflict_rate_cosine_weights_and_losses(synth_dataset, tmp_path):
    recorder = Recorder()
    fit(engine_spec(synth_dataset, tmp_path / "cache", "mmpareto", epochs=2), report=recorder)
    assert len(recorder.metrics) == 2
    for m in recorder.metrics:
        for mod in ("audio", "visual"):
            assert 0.0 <= m[f"mmpareto_conflict_rate_{mod}"] <= 1.0
            assert -1.0 <= m[f"mmpareto_cos_{mod}"] <= 1.0
            assert m[f"mmpareto_w_multi_{mod}"] + m[f"mmpareto_w_uni_{mod}"] == pytest.approx(1.0)
            assert 0.0 < m[f"mmpareto_w_multi_{mod}"] < 1.0
            # Per tensor |final| >= gamma |g_m + g_u| (diff > 1: equal; else |new| >= |sum|), so >= gamma overall.
            assert m[f"mmpareto_grad_ratio_{mod}"] >= 1.5 - 1e-4
            if m[f"mmpareto_conflict_rate_{mod}"] == 0.0:
                assert m[f"mmpareto_w_multi_{mod}"] == pytest.approx(0.5)
        assert m["loss_train"] == pytest.approx(m["loss_train_multi"] + m["loss_train_audio"] + m["loss_train_visual"], rel=1e-5)
        assert {"acc", "acc_audio", "acc_visual", "shapley_audio", "shapley_visual"} <= set(m)
