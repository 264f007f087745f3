"""AGM (Li et al., ICCV 2023): Shapley responses, scores, discrepancy ratios, running averages,
coefficients, gradient scaling and clipping by hand; the spec section; engine runs (single process
and two DDP ranks) logging the internals."""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.agm import (
    SCORE_FLOOR,
    agm_coefficients,
    clip_when_exceeded,
    discrepancy_ratios,
    global_iteration,
    modulated_output,
    mono_modal_accuracy,
    mono_modal_score_sums,
    mono_modal_scores,
    scale_gradient,
    shapley_responses,
    update_running_scores,
)
from orchestrator.specs import SpecError, load_spec
from test_engine import Recorder, engine_spec
from models import AVOutput
from workers.engine import Batch, Runtime, fit
from workers.methods import get_method

LN2, LN3 = math.log(2), math.log(3)


# ---- Shapley responses and the gradient modulation ------------------------------------------------


def test_shapley_responses_by_hand():
    joint = torch.tensor([[1.0, 2.0]])  # f(a, v)
    audio_masked = torch.tensor([[0.0, 1.0]])  # f(0, v)
    visual_masked = torch.tensor([[1.0, 0.0]])  # f(a, 0)
    phi_a, phi_v = shapley_responses(joint, audio_masked, visual_masked)
    # phi_a = ([1, 2] - [0, 1] + [1, 0]) / 2 = [1, 0.5]; phi_v = ([1, 2] - [1, 0] + [0, 1]) / 2 = [0, 1.5]
    assert phi_a.tolist() == [[1.0, 0.5]] and phi_v.tolist() == [[0.0, 1.5]]
    assert (phi_a + phi_v).tolist() == joint.tolist()  # the empty coalition is left out, as official
    with pytest.raises(ValueError, match="must all be"):
        shapley_responses(joint, audio_masked[:, :1], visual_masked)


def test_scaled_gradients_reach_each_pass_by_hand():
    """out = scale(phi_a, c_a) + scale(phi_v, c_v): d out / d joint = (c_a + c_v) / 2,
    d / d f(0, v) = (c_v - c_a) / 2, d / d f(a, 0) = (c_a - c_v) / 2 (not a per-encoder scaling)."""
    joint, audio_masked, visual_masked = (torch.randn(2, 3, requires_grad=True) for _ in range(3))
    phi_a, phi_v = shapley_responses(joint, audio_masked, visual_masked)
    out = modulated_output(phi_a, phi_v, 0.5, 2.0)
    assert torch.allclose(out, joint)
    weights = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (out * weights).sum().backward()
    assert torch.allclose(joint.grad, 1.25 * weights)
    assert torch.allclose(audio_masked.grad, 0.75 * weights)
    assert torch.allclose(visual_masked.grad, -0.75 * weights)


def test_scale_gradient_matches_the_official_backward_hook():
    """Official GradMod: an identity module with a full backward hook returning grad * scale."""

    class Identity(nn.Module):
        def forward(self, x):
            return x

    hooked = Identity()
    hooked.register_full_backward_hook(lambda m, gin, gout: (gin[0].clone() * 0.3,))
    x1 = torch.randn(4, 3, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (hooked(x1 * 2) ** 2).sum().backward()
    (scale_gradient(x2 * 2, torch.tensor(0.3, dtype=torch.float64)) ** 2).sum().backward()
    assert torch.allclose(x1.grad, x2.grad)
    with pytest.raises(ValueError, match="scalar"):
        scale_gradient(x2, torch.ones(2))


def test_mono_modal_accuracy_by_hand():
    """An additive model f(a, v) = a + v + b (inputs are the logits): phi_a = a + b/2, phi_v = v + b/2."""

    class Additive(nn.Module):
        def forward(self, audio, visual):
            return AVOutput(audio + visual + torch.tensor([0.0, 0.2]))

    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # argmax 0, 1, 0
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # argmax 0, 1, 1
    labels = torch.tensor([0, 1, 1])
    loader = [(audio[:2], visual[:2], labels[:2], None), (audio[2:], visual[2:], labels[2:], None)]
    got = mono_modal_accuracy(Additive(), loader, torch.device("cpu"), contextlib.nullcontext)
    assert got == pytest.approx({"agm_acc_audio": 2 / 3, "agm_acc_visual": 1.0})


# ---- scores, ratios, running averages, coefficients -----------------------------------------------

# Two classes, labels (0, 1). Audio: p(0 | [ln 3, 0]) = 3/4, p(1 | [0, 0]) = 1/2.
# Visual: p(0 | [0, 0]) = 1/2, p(1 | [0, -100]) = e^-100 / (1 + e^-100) < 1e-8: floored to 1e-8.
PHI_A = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
PHI_V = torch.tensor([[0.0, 0.0], [0.0, -100.0]])
LABELS = torch.tensor([0, 1])
S_A = (math.log(4 / 3) + LN2) / 2  # 0.4904
S_V = (LN2 - math.log(SCORE_FLOOR)) / 2  # (0.6931 + 18.4207) / 2 = 9.5569


def test_scores_by_hand():
    sums = mono_modal_score_sums(PHI_A, PHI_V, LABELS)
    assert sums.tolist() == pytest.approx([2 * S_A, 2 * S_V, 2.0], rel=1e-6)
    assert mono_modal_scores(PHI_A, PHI_V, LABELS).tolist() == pytest.approx([S_A, S_V], rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        mono_modal_score_sums(PHI_A, PHI_V, LABELS[:1])


def test_discrepancy_ratios_by_hand():
    # Two modalities: r_a = exp(s_v - s_a), r_v = exp(s_a - s_v) (CREMAD_main.py).
    r = discrepancy_ratios(torch.tensor([S_A, S_V], dtype=torch.float64))
    assert r.tolist() == pytest.approx([math.exp(S_V - S_A), math.exp(S_A - S_V)], rel=1e-12)
    # Three: r_m = exp(3/2 (mean - s_m)) (URFunny_main.py): scores (1, 2, 3), mean 2.
    r3 = discrepancy_ratios(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert r3.tolist() == pytest.approx([math.exp(1.5), 1.0, math.exp(-1.5)], rel=1e-12)


def test_running_average_is_the_mean_of_every_step_so_far():
    running = torch.zeros(2, dtype=torch.float64)
    running = update_running_scores(running, torch.tensor([1.2, 0.8]), 1)  # t = 1: the score itself
    assert running.tolist() == pytest.approx([1.2, 0.8])
    running = update_running_scores(running, torch.tensor([0.6, 1.0]), 2)  # (1.2 + 0.6) / 2, (0.8 + 1.0) / 2
    assert running.tolist() == pytest.approx([0.9, 0.9])
    running = update_running_scores(running, torch.tensor([0.3, 0.3]), 3)  # (0.9 * 2 + 0.3) / 3
    assert running.tolist() == pytest.approx([0.7, 0.7])
    # Official iteration = (epoch - 1) * total_batch + step + 1 with 1-based epochs: epoch 2, step 2, 4 steps -> 7.
    assert global_iteration(1, 4, 2) == 7 and global_iteration(0, 4, 0) == 1
    with pytest.raises(ValueError, match="iteration"):
        update_running_scores(running, running, 0)


def test_coefficients_by_hand():
    strength = 1.5
    # Audio leads now (s_a = 1 < s_v = 2): r = (e, 1/e); equal running averages: r_bar = (1, 1).
    step = agm_coefficients(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.5]), strength)
    assert step.ratios.tolist() == pytest.approx([math.e, 1 / math.e])
    assert step.running_ratios.tolist() == pytest.approx([1.0, 1.0])
    # c = exp(alpha (r_bar - r)): audio damped, visual boosted.
    assert step.coefficients.tolist() == pytest.approx([math.exp(strength * (1 - math.e)),
                                                        math.exp(strength * (1 - 1 / math.e))])
    # First step: running averages still 0 -> r_bar = 1.
    first = agm_coefficients(torch.tensor([S_A, S_V]), torch.zeros(2), 0.5)
    assert first.coefficients.tolist() == pytest.approx(
        [math.exp(0.5 * (1 - math.exp(S_V - S_A))), math.exp(0.5 * (1 - math.exp(S_A - S_V)))], rel=1e-6)


def test_coefficient_exponent_cap_bounds_only_the_boost():
    # s = (3, 0), s_bar = (0, 3): r_a = e^-3, r_bar_a = e^3, r_bar_a - r_a = 20.04 > 10 -> capped at 10;
    # visual: r_bar_v - r_v = e^-3 - e^3 = -20.04, not capped.
    step = agm_coefficients(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0]), 0.5, exponent_cap=10.0)
    assert step.coefficients.tolist() == pytest.approx([math.exp(5.0), math.exp(0.5 * (math.exp(-3) - math.exp(3)))])
    assert agm_coefficients(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0]), 0.5, 7.0).coefficients[0].item() == pytest.approx(math.exp(3.5))
    with pytest.raises(ValueError, match="strength"):
        agm_coefficients(torch.zeros(2), torch.zeros(2), -1.0)


# ---- clipping -----------------------------------------------------------------------------------


def _params(*grads):
    params = [nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    return params


def test_clip_only_when_the_fusion_output_gradient_leaves_the_threshold():
    encoder, fusion_out = _params([3.0, 0.0], [0.0, -0.5])
    assert not clip_when_exceeded([encoder, fusion_out], [fusion_out], 1.0).item()
    assert encoder.grad.tolist() == [3.0, 0.0]  # |fusion grad| <= 1: nothing clipped, however large the norm
    encoder, fusion_out = _params([3.0, 0.0], [0.0, -4.0])  # min < -1: clip the whole norm (5) to 1
    assert clip_when_exceeded([encoder, fusion_out], [fusion_out], 1.0).item()
    assert encoder.grad.tolist() == pytest.approx([0.6, 0.0], rel=1e-5)
    assert fusion_out.grad.tolist() == pytest.approx([0.0, -0.8], rel=1e-5)
    # Same numbers as torch's clip_grad_norm_, which the official code calls.
    ours, ref = _params([3.0, 1.0], [2.0, -7.0]), _params([3.0, 1.0], [2.0, -7.0])
    clip_when_exceeded(ours, ours[1:], 5.0)
    torch.nn.utils.clip_grad_norm_(ref, max_norm=5.0)
    for a, b in zip(ours, ref):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)


# ---- the spec section ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, field", [
    ({"modulation_strength": 0}, "method.modulation_strength"),
    ({"modulation_strength": "big"}, "method.modulation_strength"),
    ({"coefficient_exponent_cap": -1}, "method.coefficient_exponent_cap"),
    ({"fusion_grad_clip": 0}, "method.fusion_grad_clip"),
    ({"modulation_first_epoch": -1}, "method.modulation_first_epoch"),
    ({"modulation_first_epoch": 2, "modulation_end_epoch": 2}, "modulation_end_epoch"),
    ({"modulation_first_epoch": 5}, "modulation_first_epoch"),  # train.epochs is 3
    ({"alpha": 0.5}, "method.alpha: unknown field"),
])
def test_bad_settings_name_the_field(method, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load_spec({"train": {"epochs": 3}, "method": {"name": "agm", **method}})


def test_section_defaults_labels_and_run_params():
    spec = load_spec({"method": {"name": "agm"}, "model": {"fusion": "sum"}})
    m = spec.method
    assert (m.modulation_strength, m.coefficient_exponent_cap, m.fusion_grad_clip) == (1.0, 10.0, 1.0)
    assert (m.modulation_first_epoch, m.modulation_end_epoch) == (0, None)
    cls = get_method("agm")
    assert "alpha" not in cls.label_fields  # not OGM's family in the report
    assert cls.run_label(m) == ["str1"]
    assert cls.run_label(m.model_copy(update={"modulation_end_epoch": 2})) == ["str1", "w0-2"]
    assert cls.run_params(spec) == {"agm_clip_test": "fusion.fc_x.weight+fusion.fc_y.weight"}
    off = load_spec({"method": {"name": "agm", "fusion_grad_clip": None}})
    assert cls.run_params(off) == {"agm_clip_test": "off"}


# ---- one step against the official structure ------------------------------------------------------


@pytest.fixture
def one_thread():
    """The engine runs each worker on `cpus_per_worker` threads; a bare step on a shared 2-core box
    is an order of magnitude slower on more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_step_gradients_match_official_gradmod(synth_dataset, tmp_path, one_thread):
    """One AGM step's gradients equal a reference built the official way: the train-mode pass, the
    eval-mode masked passes with autograd, identity modules with backward hooks scaling by the
    coefficients computed from the scores, CE on m_a + m_v, clip when fc_out's gradient leaves [-t, t]."""
    spec = engine_spec(synth_dataset, tmp_path / "cache", "agm", epochs=1, fusion_grad_clip=1e-3)
    method = get_method("agm")(spec, Runtime())
    torch.manual_seed(0)
    model = method.build_model(3)
    reference = copy.deepcopy(model)
    method.loaders = {"train": [None] * 4}  # only its length (steps per epoch) is read
    method.setup(model, {})
    method.running_scores = torch.tensor([0.9, 1.1], dtype=torch.float64)  # as if after earlier steps
    method.start_epoch(1)
    audio, visual = torch.randn(6, 1, 32, 24), torch.randn(6, 3, 2, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights stay, the gradients are kept
    sums = defaultdict(float)
    loss = method.train_step(model, optimizer, Batch(audio, visual, labels, None), 1, 2, sums, contextlib.nullcontext)

    # The reference, written out as the official loop does it.
    scale = {"a": 1.0, "v": 1.0}

    class Out(nn.Module):
        def forward(self, x):
            return x

    m_a_o, m_v_o = Out(), Out()
    m_a_o.register_full_backward_hook(lambda m, gin, gout: (gin[0].clone() * scale["a"],))
    m_v_o.register_full_backward_hook(lambda m, gin, gout: (gin[0].clone() * scale["v"],))
    total = reference(audio, visual).logits
    reference.eval()
    pad_visual = reference(audio, torch.zeros_like(visual)).logits
    pad_audio = reference(torch.zeros_like(audio), visual).logits
    reference.train()
    out_a = 0.5 * (total - pad_audio + pad_visual)
    out_v = 0.5 * (total - pad_visual + pad_audio)
    s_a = sum(-torch.log(F.softmax(out_a, 1)[k][labels[k]]) for k in range(6)).item() / 6
    s_v = sum(-torch.log(F.softmax(out_v, 1)[k][labels[k]]) for k in range(6)).item() / 6
    train_a, train_v, alpha = 0.9, 1.1, 1.5
    coeff_a = math.exp(alpha * min(math.exp(train_v - train_a) - math.exp(s_v - s_a), 10))
    coeff_v = math.exp(alpha * min(math.exp(train_a - train_v) - math.exp(s_a - s_v), 10))
    scale.update(a=coeff_a, v=coeff_v)
    ref_loss = F.cross_entropy(m_a_o(out_a) + m_v_o(out_v), labels)
    ref_loss.backward()
    g = reference.fusion.fc_out.weight.grad
    clipped = bool(g.max() > 1e-3 or g.min() < -1e-3)
    if clipped:
        nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1e-3)

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert method.scales.tolist() == pytest.approx([coeff_a, coeff_v], rel=1e-5)
    assert sums["agm_clipped"].item() == float(clipped) == 1.0
    iteration = 1 * 4 + 2 + 1
    assert method.running_scores.tolist() == pytest.approx(
        [0.9 * (iteration - 1) / iteration + s_a / iteration, 1.1 * (iteration - 1) / iteration + s_v / iteration], rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name


# ---- through the engine ---------------------------------------------------------------------------


def test_engine_logs_internals_and_keeps_the_scale_after_the_window(synth_dataset, tmp_path):
    recorder = Recorder()
    fit(engine_spec(synth_dataset, tmp_path / "cache", "agm", epochs=3), report=recorder)  # window [0, 2)
    metrics = recorder.metrics
    assert [m["agm_modulation_active"] for m in metrics] == [1.0, 1.0, 0.0]
    for m in metrics:
        for mod in ("audio", "visual"):
            for key in ("score", "ratio", "running_ratio", "coeff", "scale", "running_score", "acc"):
                assert math.isfinite(m[f"agm_{key}_{mod}"])
        assert m["agm_ratio_audio"] > 0 and 0.0 <= m["agm_clipped"] <= 1.0
    for m in metrics[:2]:  # modulated: the applied scale is this step's coefficient
        assert m["agm_scale_audio"] == pytest.approx(m["agm_coeff_audio"], rel=1e-6)
    # After the window the scale stays at the last coefficient of epoch 1 (official: no update_scale).
    last = recorder.state(1)["method"]["scales"]
    assert (metrics[2]["agm_scale_audio"], metrics[2]["agm_scale_visual"]) == pytest.approx(last, rel=1e-6)
    # The running score is the mean over every step so far (equal steps per epoch): the mean of epoch means.
    scores = [m["agm_score_audio"] for m in metrics]
    for epoch, m in enumerate(metrics):
        assert m["agm_running_score_audio"] == pytest.approx(sum(scores[: epoch + 1]) / (epoch + 1), rel=1e-5)
    assert recorder.state(2)["method"]["running_scores"][0] == pytest.approx(metrics[2]["agm_running_score_audio"])


def test_score_sums_over_shards_give_the_global_batch_scores():
    """What the all-reduce does: per-rank [sum s_a, sum s_v, B] summed, then divided, equals the
    scores of the whole batch (official DataParallel), not the mean of the per-rank means."""
    torch.manual_seed(0)
    phi_a, phi_v, labels = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    shards = [mono_modal_score_sums(phi_a[i], phi_v[i], labels[i]) for i in (slice(0, 2), slice(2, 5))]
    total = shards[0] + shards[1]
    assert (total[:2].double() / total[2]).tolist() == pytest.approx(mono_modal_scores(phi_a, phi_v, labels).tolist(), rel=1e-6)

# DDP: every rank takes the same step (tests/test_engine.py::test_replicas_stay_identical_on_every_ddp_rank).
